"""The proxy pool over HTTP: registration keeps credentials out of the log and out of
every answer, bad URLs are 400s naming the rule, health shows in the list."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats.js.errors
import pytest
import uvicorn
from litestar.testing import AsyncTestClient
from websockets.asyncio.client import connect

from api.app import create_app
from api.services import ApiConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus, Expect
from schemas import subjects
from schemas.events import ProxyFailed, ProxyMarkedBad, ProxyRestored
from schemas.proxies import decode_secret
from tests.api_client import JOB, TEST_IDENTITY, Online, bearer, client, runner_online
from tests.conftest import NatsServer, free_port
from tests.test_proxy_failover import raw_stream

__all__ = ["client", "runner_online"]  # fixtures

SECRET = "Very-Secret-Pw"
URL = f"http://alice:{SECRET}@127.0.0.1:3128"


async def register(client: AsyncTestClient, url: str = URL, **extra: object) -> dict[str, object]:
    r = await client.post("/api/v1/proxies", json={"url": url, **extra})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


async def listed(client: AsyncTestClient, seq: int, query: str = "") -> list[dict[str, object]]:
    """The list once the read model has applied ``seq``."""
    joined = "&" if query else "?"
    r = await client.get(f"/api/v1/proxies{query}{joined}min_seq={seq}")
    assert r.status_code == 200, r.text
    found: list[dict[str, object]] = r.json()
    return found


async def test_registration_keeps_the_credentials_out_of_the_log(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    created = await register(client, label="eu")
    assert created["has_credentials"] is True and SECRET not in str(created)
    assert (created["scheme"], created["host"], created["port"]) == ("http", "127.0.0.1", 3128)
    [view] = await listed(client, int(str(created["seq"])))
    assert (view["proxy_id"], view["status"], view["label"]) == (created["proxy_id"], "ok", "eu")
    assert SECRET not in str(view) and "alice" not in str(view)
    async with await Bus.connect(nats_server.url, name="check") as bus:
        kv = await bus.kv(subjects.PROXY_SECRETS_BUCKET)
        stored = decode_secret((await kv.get(str(created["proxy_id"]))).value or b"")
        assert (stored.username, stored.password) == ("alice", SECRET)
        for message in await raw_stream(bus):
            assert SECRET.encode() not in message and b"alice" not in message


BAD_URLS = [
    ("ftp://127.0.0.1:21", "scheme must be http, https or socks5"),
    (f"alice:{SECRET}@127.0.0.1:3128", "must be scheme://"),
    ("http://bad_host!:3128", "host must be a domain name or an IP address"),
    ("http://127.0.0.1", "port must be given"),
    ("http://127.0.0.1:0", "port must be 1-65535"),
    ("http://127.0.0.1:70000", "port must be a number 1-65535"),
    (f"http://127.0.0.1:3128:alice:{SECRET}", "credentials go before the host"),
    (f"http://127.0.0.1:3128/?user=alice&pass={SECRET}", "no path, query or fragment"),
    ("socks5://alice@127.0.0.1:1080", "credentials must be user:password"),
    (f"http://:{SECRET}@127.0.0.1:3128", "credentials must be user:password"),
    (f"http://alice:{SECRET} @127.0.0.1:3128", "no spaces"),
    (f"socks5://alice:{SECRET}@[127.0.0.1:1080", "host must be a domain name or an IP"),
]


async def test_bad_urls_are_400s_naming_the_rule_never_the_secret(
    client: AsyncTestClient,
) -> None:
    for url, rule in BAD_URLS:
        r = await client.post("/api/v1/proxies", json={"url": url})
        assert r.status_code == 400, (url, r.text)
        body = r.json()
        assert body["field"] == "url" and rule in body["rule"], (url, body)
        assert SECRET not in r.text and "alice" not in r.text
    assert (await client.get("/api/v1/proxies")).json() == []


async def test_a_bypass_list_and_dns_setting_are_registered_with_the_proxy(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    created = await register(client, bypass=["Shop.Example.", "*.cdn.example"], dns="proxy")
    assert (created["bypass"], created["dns"]) == (["shop.example", "*.cdn.example"], "proxy")
    [view] = await listed(client, int(str(created["seq"])))
    assert (view["bypass"], view["dns"]) == (["shop.example", "*.cdn.example"], "proxy")
    async with await Bus.connect(nats_server.url, name="check") as bus:
        kv = await bus.kv(subjects.PROXY_SECRETS_BUCKET)
        stored = decode_secret((await kv.get(str(created["proxy_id"]))).value or b"")
        assert (stored.bypass, stored.dns) == (("shop.example", "*.cdn.example"), "proxy")
    for body, field in (
        ({"url": URL, "bypass": ["*.10.0.0.1"]}, "bypass"),
        ({"url": URL, "bypass": ["a b.example"]}, "bypass"),
        ({"url": URL, "bypass": ["a.example"] * 101}, "bypass"),
        ({"url": URL, "dns": "remote"}, "dns"),
    ):
        r = await client.post("/api/v1/proxies", json=body)
        assert (r.status_code, r.json()["field"]) == (400, field), r.text
        assert SECRET not in r.text
    assert len(await listed(client, int(str(created["seq"])))) == 1


async def test_bad_bodies_and_ids(client: AsyncTestClient) -> None:
    for body in ({"url": URL, "password": "x"}, {"url": URL, "label": "-no"}, {}):
        r = await client.post("/api/v1/proxies", json=body)
        assert r.status_code == 400 and SECRET not in r.text, r.text
    assert (await client.get("/api/v1/proxies/a.b")).status_code == 400
    assert (await client.get("/api/v1/proxies/proxy_none")).status_code == 404
    assert (await client.delete("/api/v1/proxies/proxy_none")).status_code == 404


async def test_idempotency_key_answers_the_same_proxy(client: AsyncTestClient) -> None:
    key = {"Idempotency-Key": "proxy-import-1"}
    first = await client.post("/api/v1/proxies", json={"url": URL}, headers=key)
    again = await client.post("/api/v1/proxies", json={"url": URL}, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    other = await client.post(
        "/api/v1/proxies", json={"url": "socks5://127.0.0.1:1080"}, headers=key
    )
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    assert len(await listed(client, int(first.json()["seq"]))) == 1


async def test_retire_and_health_in_the_list(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    created = await register(client)
    pid = str(created["proxy_id"])
    at = datetime.now(UTC)
    async with await Bus.connect(nats_server.url, name="engine") as bus:
        scope = subjects.proxy_stream_filter(pid)
        bad = ProxyMarkedBad(
            id="b", at=at, actor="system", proxy_id=pid, failures=3, window_seconds=60,
            bad_until=at + timedelta(seconds=30), reason="unreachable: refused",
        )  # fmt: skip
        ack = await bus.append(bad, msg_id="b", expect=Expect(scope, int(str(created["seq"]))))
        failed = ProxyFailed(
            id="f", at=at, actor="runner-1", job_id="job_1", flow_id="job_1_0_0", attempt=1,
            proxy="http://127.0.0.1:3128", reason="connection refused", proxy_id=pid,
            error="unreachable",
        )  # fmt: skip
        failed_at = await bus.append(failed, msg_id=subjects.flow_msg_id(failed))
        [view] = await listed(client, max(ack.seq, failed_at.seq))
        assert (view["status"], view["times_marked_bad"], view["failures"]) == ("bad", 1, 1)
        assert view["last_error"] == "unreachable: connection refused"
        assert view["bad_since"] and view["bad_until"] and view["reason"]
        back = ProxyRestored(id="r", at=at, actor="system", proxy_id=pid, check="tunnel")
        ack = await bus.append(back, msg_id="r", expect=Expect(scope, ack.seq))
        [view] = await listed(client, ack.seq)
        assert view["status"] == "ok" and view["restored_at"] and "bad_until" not in view
        r = await client.delete(f"/api/v1/proxies/{pid}")
        assert r.status_code == 202 and r.json()["status"] == "retired"
        assert (await client.post(f"/api/v1/proxies/{pid}/retire")).status_code == 409
        assert await listed(client, r.json()["seq"]) == []
        [retired] = await listed(client, r.json()["seq"], "?status=retired")
        assert retired["proxy_id"] == pid and retired["retired_at"]
        kv = await bus.kv(subjects.PROXY_SECRETS_BUCKET)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(pid)


async def test_a_job_names_only_registered_proxies(
    client: AsyncTestClient, runner_online: Online
) -> None:
    await runner_online()
    created = await register(client)
    pid = str(created["proxy_id"])
    job = msgspec.json.decode(msgspec.json.encode(JOB))
    job["settings"]["proxies"] = {"ids": [pid, "proxy_unknown"]}
    r = await client.post("/api/v1/jobs", json=job)
    assert r.status_code == 422 and r.json()["field"] == "settings.proxies.ids[1]", r.text
    job["settings"]["proxies"] = {"ids": [pid], "label": "eu"}
    r = await client.post("/api/v1/jobs", json=job)
    assert r.status_code == 400 and r.json()["field"] == "settings.proxies.label", r.text
    job["settings"]["proxies"] = {"ids": [pid]}
    job["settings"]["proxy_switching"] = True
    assert (await client.post("/api/v1/jobs", json=job)).status_code == 201


async def test_websocket_pushes_proxy_updates(nats_server: NatsServer, tmp_path: Path) -> None:
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "read.db")
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(20):
            await wait_for_port("127.0.0.1", port)
            headers = await bearer(f"http://127.0.0.1:{port}")
            async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/v1/proxies",
                    data=json.dumps({"url": URL, "label": "eu"}).encode(),
                    headers={"Content-Type": "application/json", **headers},
                )
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
                update = json.loads(await ws.recv())
    finally:
        server.should_exit = True
        await serving
    assert update["type"] == "proxyUpdate"
    assert update["proxy"]["status"] == "ok" and update["proxy"]["label"] == "eu"
    assert SECRET not in json.dumps(update)
