"""Runner keys over the API: made by an admin, shown once, traded for NATS credentials,
revoked; stored as digests and recorded as events that hold no secret."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from litestar.testing import AsyncTestClient

from engine.bus import Bus
from engine.runner_keys import RunnerKeys, issue, password_for, split_key
from schemas import subjects
from schemas.events import RunnerKeyCreated, RunnerKeyRevoked, encode_event
from schemas.stored import Undecodable, decode_stored
from schemas.values import Platform
from tests.api_client import client
from tests.conftest import NatsServer

__all__ = ["client"]  # fixtures

KEYS = "/api/v1/runners/keys"
EXCHANGE = "/api/v1/runners/credentials"


async def make_key(client: AsyncTestClient, name: str = "edge-1") -> dict[str, str]:
    r = await client.post(KEYS, json={"name": name})
    assert r.status_code == 201, r.text
    made: dict[str, str] = r.json()
    return made


async def test_a_key_is_shown_once_listed_without_secrets_and_kept_as_digests(
    client: AsyncTestClient,
    nats_server: NatsServer,
) -> None:
    made = await make_key(client)
    assert made["key"].startswith(made["key_id"] + ".")
    listed = (await client.get(KEYS)).json()
    assert [k["key_id"] for k in listed] == [made["key_id"]]
    assert listed[0]["name"] == "edge-1" and listed[0]["runner_id"] == made["runner_id"]
    _, secret = split_key(made["key"]) or ("", "")
    async with await Bus.connect(nats_server.url, name="t") as bus:
        kv = await bus.kv(subjects.RUNNER_KEYS_BUCKET)
        stored = (await kv.get(made["key_id"])).value or b""
        assert secret.encode() not in stored
        assert password_for(secret).encode() not in stored
        (env,) = await bus.load(subjects.runner_key_stream_filter(made["key_id"]))
    assert isinstance(env.event, RunnerKeyCreated)
    assert env.subject == f"tb.runnerkey.{made['key_id']}.RunnerKeyCreated"
    assert secret not in str(env.event)


async def test_the_key_trades_for_credentials_for_the_platform_it_declares(
    client: AsyncTestClient,
    nats_server: NatsServer,
) -> None:
    made = await make_key(client)
    r = await client.post(
        EXCHANGE, json={"os": "linux", "browser": "firefox"}, headers={"X-Runner-Key": made["key"]}
    )
    assert r.status_code == 200, r.text
    got = r.json()
    _, secret = split_key(made["key"]) or ("", "")
    assert got["runner_id"] == got["user"] == made["runner_id"]
    assert got["password"] == password_for(secret)
    assert got["nats_url"] == nats_server.url
    assert (got["os"], got["browser"]) == ("linux", "firefox")
    async with await Bus.connect(nats_server.url, name="t") as bus:
        record = await RunnerKeys(bus).get(made["key_id"])
        assert record is not None and record.platform is not None
        assert record.platform.browser == "firefox"
        # the platform's dispatch consumer is there before the runner comes
        await bus.js.consumer_info(subjects.EVENTS_STREAM, "dispatch_linux_firefox")
    listed = (await client.get(KEYS)).json()
    assert (listed[0]["os"], listed[0]["browser"]) == ("linux", "firefox")


@pytest.mark.parametrize(
    "key",
    [None, "", "nonsense", "rk_unknown.secret", "../../x.y", "a" * 300],
)
async def test_a_missing_or_wrong_key_gets_403(
    client: AsyncTestClient,
    key: str | None,
) -> None:
    made = await make_key(client)
    headers = {} if key is None else {"X-Runner-Key": key}
    r = await client.post(EXCHANGE, json={}, headers=headers)
    assert r.status_code == 403, r.text
    assert r.json()["detail"].endswith("Invalid runner key")
    # the right id with another secret
    wrong = made["key_id"] + ".not-the-secret"
    r = await client.post(EXCHANGE, json={}, headers={"X-Runner-Key": wrong})
    assert r.status_code == 403


async def test_a_revoked_key_gets_403_and_its_revocation_is_an_event(
    client: AsyncTestClient,
    nats_server: NatsServer,
) -> None:
    made = await make_key(client)
    r = await client.delete(f"{KEYS}/{made['key_id']}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    r = await client.post(EXCHANGE, json={}, headers={"X-Runner-Key": made["key"]})
    assert r.status_code == 403
    assert (await client.get(KEYS)).json() == []
    assert (await client.delete(f"{KEYS}/{made['key_id']}")).status_code == 404
    assert (await client.delete(f"{KEYS}/bad..id")).status_code in (400, 404)
    async with await Bus.connect(nats_server.url, name="t") as bus:
        events = await bus.load(subjects.runner_key_stream_filter(made["key_id"]))
    assert [type(e.event) for e in events] == [RunnerKeyCreated, RunnerKeyRevoked]


async def test_bad_input_names_the_field(client: AsyncTestClient) -> None:
    r = await client.post(KEYS, json={"name": ""})
    assert r.status_code == 400
    assert "name" in r.json()["detail"]
    r = await client.post(KEYS, json={"name": "x", "extra": 1})
    assert r.status_code == 400
    made = await make_key(client)
    r = await client.post(EXCHANGE, json={"os": "beos"}, headers={"X-Runner-Key": made["key"]})
    assert r.status_code == 400
    assert "os" in r.json()["detail"]


def test_runner_key_events_decode_on_their_subject_only() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    created = RunnerKeyCreated(
        id="e1", at=at, actor="admin", key_id="rk_1", name="edge", runner_id="runner_rk_1"
    )
    revoked = RunnerKeyRevoked(id="e2", at=at, actor="admin", key_id="rk_1")
    for event in (created, revoked):
        subject = subjects.subject_for(event)
        assert subject == f"tb.runnerkey.rk_1.{type(event).__name__}"
        assert decode_stored(subject, encode_event(event), None) == event
        with pytest.raises(Undecodable):  # not where a runner may publish
            decode_stored(f"tb.runner.rk_1.{type(event).__name__}", encode_event(event), None)


async def test_an_exchange_racing_a_revocation_cannot_bring_the_key_back(bus: Bus) -> None:
    keys = RunnerKeys(bus)
    issued = issue("racing", "admin")
    await keys.add(issued.record)
    looked_up = await keys.get(issued.record.key_id)  # the exchange read it...
    assert looked_up is not None
    assert await keys.remove(issued.record.key_id)  # ...then the admin revoked it
    assert await keys.set_platform(looked_up, Platform(os="linux")) is None
    assert await keys.get(issued.record.key_id) is None
    assert await keys.all() == []


async def test_a_runner_key_opens_no_route_but_its_exchange_and_a_user_token_not_that_one(
    client: AsyncTestClient,
) -> None:
    key = (await make_key(client, "edge-9"))["key"]
    anonymous = AsyncTestClient(app=client.app)
    anonymous.blocking_portal = client.blocking_portal
    for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"X-Runner-Key": key}):
        for method, path in (("GET", "/api/v1/jobs"), ("GET", "/api/v1/runners"),
                             ("POST", "/api/v1/logs"), ("GET", "/api/v1/auth/me")):  # fmt: skip
            r = await anonymous.request(method, path, headers=headers, json={})
            assert r.status_code in (401, 403), (headers, method, path, r.status_code)
    # the admin's own session is no runner credential
    r = await client.post(EXCHANGE, json={"os": "linux", "browser": "chromium"})
    assert r.status_code == 403
