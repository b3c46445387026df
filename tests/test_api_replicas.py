"""Two API replicas on one stream, each with its own read model: a write through one is
read through the other with ``min_seq`` (or ``TB-Min-Seq``), and both answer alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from litestar.testing import AsyncTestClient

from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus, BusConfig
from tests.api_client import JOB, TEST_IDENTITY, log_in, put_presence
from tests.conftest import NatsServer
from tests.test_api_metrics import a_run

READS = [
    "/api/v1/jobs",
    "/api/v1/jobs?limit=2",
    "/api/v1/jobs?status=created",
    "/api/v1/consents",
    "/api/v1/proxies",
    "/api/v1/runners/status",
    "/api/v1/metrics/summary",
]


@asynccontextmanager
async def replica(
    nats_url: str, db: Path, token: str | None = None
) -> AsyncIterator[AsyncTestClient]:
    """A replica with a client that logs in as admin, or uses ``token`` (one login for
    both replicas: a second login would end the first session)."""
    config = ApiConfig(
        nats_url=nats_url, db_path=db, bus=BusConfig(presence_ttl=30), identity=TEST_IDENTITY
    )
    async with AsyncTestClient(app=create_app(config)) as client:
        if token is None:
            await log_in(client)
        else:
            client.headers["Authorization"] = f"Bearer {token}"
        yield client


def token_of(client: AsyncTestClient) -> str:
    return str(client.headers["Authorization"]).removeprefix("Bearer ")


async def test_a_write_through_one_replica_reads_through_the_other(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    async with (
        replica(nats_server.url, tmp_path / "a.db") as a,
        replica(nats_server.url, tmp_path / "b.db", token_of(a)) as b,
    ):
        await a_run(bus)  # flows with outcomes and timings, for the metrics to agree on
        for n in range(3):
            writer, reader = (a, b) if n % 2 == 0 else (b, a)
            await put_presence(bus)  # a runner's heartbeat: ``bus`` made its TTL 3 s
            created = await writer.post("/api/v1/jobs", json={**JOB, "name": f"job {n}"})
            assert created.status_code == 201, created.text
            job_id, seq = created.json()["job_id"], created.json()["seq"]
            by_header = await reader.get(f"/api/v1/jobs/{job_id}", headers={"TB-Min-Seq": str(seq)})
            assert by_header.status_code == 200, by_header.text
            assert by_header.json()["name"] == f"job {n}"
            listed = await reader.get(f"/api/v1/jobs?min_seq={seq}")
            assert job_id in [j["job_id"] for j in listed.json()]
        claimed = await a.post("/api/v1/consents", json={"domain": "example.com"})
        proxy = await b.post("/api/v1/proxies", json={"url": "http://127.0.0.1:3128"})
        last = max(claimed.json()["seq"], proxy.json()["seq"])
        barrier = {"TB-Min-Seq": str(last)}
        for path in [*READS, "/api/v1/jobs/job_m"]:
            from_a = await a.get(path, headers=barrier)
            from_b = await b.get(path, headers=barrier)
            assert from_a.status_code == from_b.status_code == 200, (path, from_a.text)
            body_a, body_b = from_a.json(), from_b.json()
            if path.startswith("/api/v1/runners"):
                for runner in (*body_a, *body_b):
                    runner.pop("uptime_seconds", None)  # the time of the read
            if path == "/api/v1/jobs/job_m":
                for m in (body_a["metrics"], body_b["metrics"]):
                    m.pop("rate_per_second"), m.pop("eta_seconds")  # the time of the read
            assert body_a == body_b, path
            assert from_a.headers.get("TB-Next-Cursor") == from_b.headers.get("TB-Next-Cursor")
