"""What an adversarial probe of the running API found: each input answers 4xx, never hangs,
never a 500 without a log line, and stores nothing."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import pytest
import structlog
from litestar import get
from litestar.testing import AsyncTestClient

from api.authz import access
from engine.bus import Bus
from schemas import subjects
from tests.api_client import JOB, Online, client, put_presence, runner_online
from tests.conftest import NatsServer

__all__ = ["client", "runner_online"]  # fixtures

WAIT = 10.0  # every answer comes at once; a hang fails here instead of at the suite timeout


async def stored_events(nats_server: NatsServer) -> int:
    async with await Bus.connect(nats_server.url, name="test-count") as bus:
        return await bus.last_seq()


async def test_presence_entry_that_does_not_decode_is_skipped(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    async with await Bus.connect(nats_server.url, name="test-presence") as bus:
        kv = await bus.kv(subjects.RUNNERS_BUCKET)
        await kv.put("not_json", b"{not json")
        await kv.put("wrong_shape", b'{"runner_id": 5, "os": "beos"}')
        await put_presence(bus)
    async with asyncio.timeout(WAIT):
        runners = await client.get("/api/v1/runners")
        assert runners.status_code == 200, runners.text
        assert [r["id"] for r in runners.json()] == ["runner_linux"]
        created = await client.post("/api/v1/jobs", json=JOB)
        assert created.status_code == 201, created.text
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text


@pytest.mark.parametrize(
    "path", ["/api/v1/jobs", "/api/v1/consents", "/api/v1/consents/example.com/verify"]
)
@pytest.mark.parametrize("depth", [33, 1000])
async def test_json_nested_deeper_than_the_limit_is_400_naming_the_rule(
    client: AsyncTestClient, nats_server: NatsServer, path: str, depth: int
) -> None:
    body = b'{"name": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    before = await stored_events(nats_server)  # the first admin and their login
    async with asyncio.timeout(WAIT):
        r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "body"
    assert "at most 32 levels" in r.json()["rule"]
    assert await stored_events(nats_server) == before


async def test_json_within_the_depth_limit_is_decoded(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    # brackets inside strings nest nothing
    body = {**JOB, "name": "[[[[{{{{" * 20}
    r = await client.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text


async def test_an_unexpected_error_is_a_500_logged_with_its_traceback(
    client: AsyncTestClient,
) -> None:
    @get("/test-only/boom", sync_to_thread=False, opt=access("public"))
    def boom() -> None:
        raise RuntimeError("internal detail that must not leak")

    client.app.register(boom)
    with structlog.testing.capture_logs() as logs:
        r = await client.get("/test-only/boom")
    assert r.status_code == 500
    assert "internal detail" not in r.text
    (entry,) = [e for e in logs if e["event"] == "api.internal_error"]
    assert isinstance(entry["exc_info"], RuntimeError)
    assert entry["exc_info"].__traceback__ is not None
    assert entry["path"] == "/test-only/boom"
    assert entry["error_id"] in r.json()["detail"]


@pytest.mark.parametrize(
    "base_url",
    [
        "http://[::1",
        "http://127.0.0.1:abc",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "ftp://127.0.0.1",
        "http://",
        "http://127.0.0.1 :80",
    ],
)
async def test_verify_with_a_base_url_that_does_not_parse_is_400_naming_base_url(
    client: AsyncTestClient, base_url: str
) -> None:
    await client.post("/api/v1/consents", json={"domain": "127.0.0.1"})
    async with asyncio.timeout(WAIT):
        r = await client.post("/api/v1/consents/127.0.0.1/verify", json={"base_url": base_url})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "base_url"


MALFORMED_IDS = ["*", ">", "job x", "job_x\n", "job_x ", "a.b", "-job", "x" * 129, "jöb"]


@pytest.mark.parametrize("job_id", MALFORMED_IDS)
async def test_a_malformed_job_id_is_400_and_stores_nothing(
    client: AsyncTestClient, nats_server: NatsServer, job_id: str
) -> None:
    before = await stored_events(nats_server)  # the first admin and their login
    path = f"/api/v1/jobs/{quote(job_id, safe='*>')}"
    async with asyncio.timeout(WAIT):
        for method, url in [
            ("GET", path),
            ("POST", f"{path}/cancel"),
            ("POST", f"{path}/pause"),
            ("POST", f"{path}/resume"),
        ]:
            r = await client.request(method, url)
            assert r.status_code == 400, (method, url, r.text)
            assert r.json()["field"] == "job_id"
    assert await stored_events(nats_server) == before


async def test_a_well_formed_unknown_job_id_is_404(client: AsyncTestClient) -> None:
    async with asyncio.timeout(WAIT):
        for method, url in [
            ("GET", "/api/v1/jobs/job_nope"),
            ("POST", "/api/v1/jobs/job_nope/cancel"),
            ("POST", "/api/v1/jobs/job_nope/pause"),
            ("POST", "/api/v1/jobs/job_nope/resume"),
        ]:
            r = await client.request(method, url)
            assert r.status_code == 404, (method, url, r.text)
            assert r.json()["field"] == "job_id"


MALFORMED_DOMAINS = ["example.com\n", "exa mple.com", "*", "example.*", "a..b", "-x.com"]


@pytest.mark.parametrize("domain", MALFORMED_DOMAINS)
async def test_a_malformed_domain_is_400_and_stores_nothing(
    client: AsyncTestClient, nats_server: NatsServer, domain: str
) -> None:
    before = await stored_events(nats_server)  # the first admin and their login
    path = f"/api/v1/consents/{quote(domain, safe='*')}"
    async with asyncio.timeout(WAIT):
        claim = await client.post("/api/v1/consents", json={"domain": domain})
        assert claim.status_code == 400, claim.text
        assert claim.json()["field"] == "domain"
        for url, body in [(f"{path}/verify", {}), (f"{path}/revoke", {"reason": "r"})]:
            r = await client.post(url, json=body)
            assert r.status_code == 400, (url, r.text)
            assert r.json()["field"] == "domain"
    assert await stored_events(nats_server) == before


@pytest.mark.parametrize(
    ("body", "status"), [(b"\xff not json", 400), (b'{"name": "' + b"x" * 40_000 + b'"}', 413)]
)
async def test_a_body_that_cannot_be_read_is_refused_naming_the_body(
    client: AsyncTestClient, body: bytes, status: int
) -> None:
    r = await client.post(
        "/api/v1/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["field"] == "body" and r.json()["rule"]
