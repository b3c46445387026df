from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from engine.bus import Bus
from tests.api_client import JOB, Online, api_config, bearer, client, put_presence, runner_online
from tests.conftest import NatsServer
from tests.sites import recording_site

__all__ = ["client", "runner_online"]  # fixtures


async def test_health_and_openapi(client: AsyncTestClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/api/v1/jobs" in schema["paths"]


async def test_readyz_names_the_missing_runner(client: AsyncTestClient) -> None:
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert "runner" in r.json()["missing"]


async def test_create_job_returns_id_and_seq_and_reads_wait_for_it(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    r = await client.post("/api/v1/jobs", json=JOB)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["job_id"].startswith("job_") and created["seq"] > 0
    r = await client.get(f"/api/v1/jobs/{created['job_id']}?min_seq={created['seq']}")
    assert r.status_code == 200
    job = r.json()
    assert job["status"] == "created"
    assert job["flows_total"] == 2 and job["flows_done"] == 0 and job["flows_failed"] == 0
    (target,) = job["targets"]
    assert {
        k: target[k] for k in ("url", "flow_done", "flow_target", "click_done", "click_target")
    } == {
        "url": "http://127.0.0.1:9/",
        "flow_done": 0,
        "flow_target": 2,
        "click_done": 0,
        "click_target": 2,
    }
    listed = (await client.get("/api/v1/jobs")).json()
    assert [j["job_id"] for j in listed] == [created["job_id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**JOB, "settings": {"instance_count": 0}}, "instance_count"),
        ({**JOB, "targets": []}, "targets"),
        ({**JOB, "targets": [{"url": "ftp://x/"}]}, "url"),
        ({**JOB, "name": ""}, "name"),
        ({**JOB, "surprise": 1}, "surprise"),
        ({**JOB, "platform": {"os": "beos"}}, "os"),
    ],
)
async def test_bad_job_is_a_400_naming_the_field_and_changes_nothing(
    client: AsyncTestClient, body: dict[str, object], field: str
) -> None:
    r = await client.post("/api/v1/jobs", json=body)
    assert r.status_code == 400, r.text
    assert field in r.text
    assert (await client.get("/api/v1/jobs")).json() == []


async def test_unknown_job_is_404(client: AsyncTestClient) -> None:
    r = await client.get("/api/v1/jobs/job_nope")
    assert r.status_code == 404 and "job_id" in r.json()["detail"]
    assert (await client.post("/api/v1/jobs/job_nope/cancel")).status_code == 404


async def test_cancel_created_job_then_cancel_again_is_409(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    job_id = (await client.post("/api/v1/jobs", json=JOB)).json()["job_id"]
    r = await client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202
    r2 = await client.get(f"/api/v1/jobs/{job_id}?min_seq={r.json()['seq']}")
    assert r2.json()["status"] == "cancelled"
    again = await client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]


async def test_consent_claim_verify_and_list(client: AsyncTestClient) -> None:
    r = await client.post("/api/v1/consents", json={"domain": "127.0.0.1"})
    assert r.status_code == 201
    claimed = r.json()
    assert claimed["well_known_url"] == "https://127.0.0.1/.well-known/trafficbuster.txt"
    with recording_site(token=claimed["token"]) as site:
        r = await client.post("/api/v1/consents/127.0.0.1/verify", json={"base_url": site.base_url})
    assert r.status_code == 200, r.text
    assert r.json()["domain"] == "127.0.0.1" and r.json()["status"] == "verified"
    consents = (await client.get("/api/v1/consents")).json()
    assert any(c["domain"] == "127.0.0.1" for c in consents)


async def test_verify_with_wrong_token_is_422_naming_why(client: AsyncTestClient) -> None:
    await client.post("/api/v1/consents", json={"domain": "127.0.0.1"})
    with recording_site(token="not-the-token") as site:
        r = await client.post("/api/v1/consents/127.0.0.1/verify", json={"base_url": site.base_url})
    assert r.status_code == 422
    assert "does not serve the claimed token" in r.json()["detail"]


async def test_verify_refuses_a_base_url_on_another_host(client: AsyncTestClient) -> None:
    await client.post("/api/v1/consents", json={"domain": "127.0.0.1"})
    r = await client.post(
        "/api/v1/consents/127.0.0.1/verify", json={"base_url": "http://127.0.0.2:9"}
    )
    assert r.status_code == 422 and r.json()["field"] == "base_url"


async def test_verify_unclaimed_domain_is_404(client: AsyncTestClient) -> None:
    r = await client.post("/api/v1/consents/example.com/verify", json={})
    assert r.status_code == 404 and "not been claimed" in r.json()["detail"]


async def test_bad_domain_is_400(client: AsyncTestClient) -> None:
    r = await client.post("/api/v1/consents", json={"domain": "not a domain"})
    assert r.status_code == 400 and "domain" in r.text


async def test_available_platforms_empty_without_runners(client: AsyncTestClient) -> None:
    assert (await client.get("/api/v1/runners/available-platforms")).json() == []
    assert (await client.get("/api/v1/runners")).json() == []


async def test_available_platforms_are_those_with_a_runner_online(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online("linux")
    await runner_online("windows")
    platforms = (await client.get("/api/v1/runners/available-platforms")).json()
    assert [(p["os"], p["browser"], p["runners"]) for p in platforms] == [
        ("linux", "chromium", 1),
        ("windows", "chromium", 1),
    ]


async def test_job_for_a_platform_without_runners_is_409(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online("linux")
    r = await client.post("/api/v1/jobs", json={**JOB, "platform": {"os": "macos"}})
    assert r.status_code == 409
    assert r.json()["field"] == "platform"
    assert "No available runners online for macos/chromium" in r.json()["detail"]
    assert (await client.get("/api/v1/jobs")).json() == []


async def test_websocket_pushes_progress_updates(nats_server: NatsServer, tmp_path: Path) -> None:
    import uvicorn
    from websockets.asyncio.client import connect

    from cli.nats_server import wait_for_port
    from tests.conftest import free_port

    app = create_app(api_config(nats_server, tmp_path))
    async with await Bus.connect(nats_server.url, name="test") as bus:
        await bus.provision()
        await put_presence(bus)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            await wait_for_port("127.0.0.1", port)
            headers = await bearer(f"http://127.0.0.1:{port}")
            async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
                created = await asyncio.to_thread(
                    _post_json, f"http://127.0.0.1:{port}/api/v1/jobs", JOB, headers
                )
                update = json.loads(await ws.recv())
                while update["type"] != "progressUpdate":  # jobInfo comes first
                    update = json.loads(await ws.recv())
    finally:
        server.should_exit = True
        await serving
    assert update["type"] == "progressUpdate"
    assert update["job_id"] == created["job_id"]
    assert (update["status"], update["total"], update["success"], update["fail"]) == (
        "created",
        2,
        0,
        0,
    )
    assert update["targets"][0]["flow_target"] == 2


def _post_json(url: str, body: object, headers: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


async def test_a_missing_or_unknown_top_level_field_is_named_as_sent(
    client: AsyncTestClient,
) -> None:
    for body, field in (
        ({}, "name"),
        ({"name": "x"}, "targets"),
        ({"name": "x", "targets": [{}]}, "targets[0].url"),
        ({**JOB, "nope": 1}, "nope"),
    ):
        r = await client.post("/api/v1/jobs", json=body)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
