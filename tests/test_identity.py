"""Login, sessions, API keys, roles and the first admin, through the API on a real
nats-server."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from websockets.asyncio.client import connect

from api.app import create_app
from api.services import ApiConfig, IdentityConfig
from engine.bus import Bus
from engine.identity.sessions import SessionPolicy
from schemas import subjects
from schemas.events import LoginFailed, UserLoggedIn, UserLoggedOut
from schemas.licences import plan_named
from tests.api_client import (
    ADMIN_PASSWORD,
    ClientAs,
    api_config,
    bearer,
    client,
    client_as,
    log_in,
    served,
)
from tests.conftest import NatsServer

__all__ = ["client", "client_as"]

LOGIN = "/api/v1/auth/login"


async def user_events(nats_url: str, event_type: str) -> list[Any]:
    async with await Bus.connect(nats_url, name="test-read") as bus:
        return [e.event for e in await bus.load(subjects.all_users(event_type))]


async def test_login_me_logout(client: AsyncTestClient, nats_server: NatsServer) -> None:
    r = await client.post(LOGIN, json={"username": "admin", "password": ADMIN_PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token"] and body["expires_at"] > time.time() + 7 * 3600
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    client.headers["Authorization"] = f"Bearer {body['token']}"
    client.cookies.clear()
    me = (await client.get("/api/v1/auth/me")).json()
    assert (me["username"], me["role"], me["via"]) == ("admin", "admin", "session")
    assert me["licence"]["plan"] == me["plan"] and "features" in me["licence"]
    assigned = await client.put(f"/api/v1/users/{me['user_id']}/licence", json={"plan": "trial"})
    assert assigned.status_code in (200, 201, 202), assigned.text
    seq = assigned.json()["seq"]
    # the caller is resolved before any read barrier of the request: wait in a read first
    assert (await client.get(f"/api/v1/jobs?limit=1&min_seq={seq}")).status_code == 200
    me = (await client.get("/api/v1/auth/me")).json()
    assert me["plan"] == me["licence"]["plan"] == "trial"
    assert me["licence"]["features"] == plan_named("trial").matrix()["features"]
    # what the API writes names the user who asked for it
    claimed = (await client.post("/api/v1/consents", json={"domain": "example.com"})).json()
    audit = await client.get(f"/api/v1/audit?type=DomainClaimed&min_seq={claimed['seq']}")
    assert [e["actor"] for e in audit.json()["items"]] == [me["user_id"]]
    assert (await client.post("/api/v1/auth/logout")).status_code == 204
    after = await client.get("/api/v1/jobs")
    assert after.status_code == 401
    assert (await client.get("/api/v1/auth/me")).status_code == 401
    logged_out = await user_events(nats_server.url, "UserLoggedOut")
    assert [e.reason for e in logged_out if isinstance(e, UserLoggedOut)][-1] == "logout"
    for event in await user_events(nats_server.url, "*"):  # no secret in any user event
        text = msgspec.json.encode(event).decode()
        assert body["token"] not in text and ADMIN_PASSWORD not in text


async def test_a_new_login_ends_the_older_session_but_not_api_keys(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    old = client.headers["Authorization"]
    key = await client.post("/api/v1/api-keys", json={"name": "ci", "scopes": []})
    assert key.status_code == 201, key.text
    api_key = key.json()["key"]
    await log_in(client)  # a second interactive login
    assert (await client.get("/api/v1/jobs", headers={"Authorization": old})).status_code == 401
    assert (await client.get("/api/v1/jobs")).status_code == 200
    with_key = await client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {api_key}"})
    assert with_key.status_code == 200
    with_x = await client.get(
        "/api/v1/auth/me", headers={"Authorization": "", "X-API-Key": api_key}
    )
    assert with_x.status_code == 200 and with_x.json()["via"] == "api_key"
    reasons = [e.reason for e in await user_events(nats_server.url, "UserLoggedOut")]
    assert "new login" in reasons
    logged_in = await user_events(nats_server.url, "UserLoggedIn")
    assert len({e.session_id for e in logged_in if isinstance(e, UserLoggedIn)}) == 2


async def test_wrong_passwords_are_throttled_with_a_growing_wait(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    identity = client.app.state.identity
    identity.clock = lambda: 1_000_000.0  # time stands still: no wait ever runs out
    unknown = await client.post(LOGIN, json={"username": "nobody", "password": "y" * 12})
    assert unknown.status_code == 401
    codes, waits = [], []
    for _ in range(20):
        r = await client.post(LOGIN, json={"username": "admin", "password": "x" * 12})
        codes.append(r.status_code)
        if r.status_code == 429:
            waits.append(int(r.headers["retry-after"]))
    assert codes[:4] == [401] * 4 and codes[4:] == [429] * 16
    assert waits == sorted(waits) and waits[-1] > waits[0]
    failed = [e for e in await user_events(nats_server.url, "LoginFailed")]
    reasons = [e.reason for e in failed if isinstance(e, LoginFailed)]
    assert reasons.count("wrong password") == 4 and reasons.count("throttled") == 16
    assert reasons[0] == "unknown user"


async def test_every_route_declares_who_may_call_it(
    client: AsyncTestClient, client_as: ClientAs
) -> None:
    """Walks the whole route table: a route added without an access level fails here."""
    viewer, operator = await client_as("viewer"), await client_as("operator")
    anonymous = AsyncTestClient(app=client.app)
    anonymous.blocking_portal = client.blocking_portal
    callers = {"anonymous": anonymous, "viewer": viewer, "operator": operator, "admin": client}
    checked = 0
    for route in client.app.routes:
        for handler in getattr(route, "route_handlers", None) or []:
            methods = sorted(getattr(handler, "http_methods", ()))
            if methods == ["OPTIONS"]:
                continue
            level = handler.opt.get("access")
            assert level in ("public", "viewer", "operator", "admin", "ingest", "runner_key"), (
                route.path
            )
            path = route.path.replace("{path:str}", "x")
            # every parameter, whatever its name and type: a path left unfilled would
            # answer 404 before the guard and check nothing
            path = re.sub(r"\{[a-z_]+:int\}", "1", path)
            path = re.sub(r"\{[a-z_]+:str\}", "nosuch", path)
            assert "{" not in path, path
            for method in methods:
                if path == "/api/v1/auth/logout":
                    continue  # checked on its own: it would end the caller's session
                for who, caller in callers.items():
                    r = await caller.request(method, path, json={}, timeout=10)
                    refused = r.status_code in (401, 403)
                    if level == "runner_key":  # a runner key and nothing else: no user opens it
                        assert r.status_code == 403, (who, method, path, r.text)
                        checked += 1
                        continue
                    if level == "ingest":  # the route's own key guard answers 403 itself
                        assert r.status_code != 401, (who, method, path)
                        refused = refused and "Invalid API key" not in r.text
                    rank = {"anonymous": 0, "viewer": 1, "operator": 2, "admin": 3}[who]
                    need = {"public": 0, "ingest": 0, "viewer": 1, "operator": 2, "admin": 3}
                    expect_refused = rank < need[level]
                    assert refused == expect_refused, (who, method, path, r.status_code, r.text)
                    if expect_refused:
                        assert r.status_code == (401 if who == "anonymous" else 403)
                        if who != "anonymous":
                            assert level in r.json()["detail"]
                    checked += 1
    assert checked > 150


async def test_users_admin_roles_disable_and_keys(
    client: AsyncTestClient, client_as: ClientAs
) -> None:
    viewer = await client_as("viewer")
    me = (await viewer.get("/api/v1/auth/me")).json()
    assert (await viewer.post("/api/v1/jobs", json={})).status_code == 403
    key = (await viewer.post("/api/v1/api-keys", json={"name": "mine"})).json()
    users = (await client.get("/api/v1/users")).json()
    assert {u["username"] for u in users} >= {"admin", me["username"]}
    bad = await client.post("/api/v1/users", json={"username": "shorty", "password": "short"})
    assert bad.status_code == 400 and bad.json()["field"] == "password"
    assert "12" in bad.json()["detail"]
    dup = await client.post(
        "/api/v1/users", json={"username": "ADMIN", "password": "p" * 12, "role": "viewer"}
    )
    assert dup.status_code == 409
    # a higher role for the user: their session and key follow it
    r = await client.patch(f"/api/v1/users/{me['user_id']}", json={"role": "operator"})
    assert r.status_code == 200 and r.json()["role"] == "operator"
    # past the guard once this replica's read model has the new role (milliseconds)
    for _ in range(100):
        if (passed := await viewer.post("/api/v1/jobs", json={})).status_code != 403:
            break
        await asyncio.sleep(0.02)
    assert passed.status_code == 400
    # the key acts as its user, who is now an operator
    with_key = {"Authorization": f"Bearer {key['key']}"}
    assert (await client.post("/api/v1/jobs", json={}, headers=with_key)).status_code == 400
    listed = (await client.get("/api/v1/api-keys")).json()
    assert key["key_id"] in [k["key_id"] for k in listed]  # an admin sees every key
    # disabled: the session ends at once and the key stops working
    r = await client.patch(f"/api/v1/users/{me['user_id']}", json={"disabled": True})
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert (await viewer.get("/api/v1/jobs")).status_code == 401
    assert (await client.get("/api/v1/auth/me", headers=with_key)).status_code == 401
    relogin = await client.post(
        LOGIN, json={"username": me["username"], "password": f"{me['username']}-password-long"}
    )
    assert relogin.status_code == 403
    await log_in(client)  # the relogin attempt set the disabled user's cookie? no: admin again
    r = await client.patch(f"/api/v1/users/{me['user_id']}", json={"disabled": False})
    assert r.json()["disabled"] is False
    reset = await client.post(
        f"/api/v1/users/{me['user_id']}/password", json={"password": "a-new-password-1"}
    )
    assert reset.status_code == 204
    await log_in(viewer, me["username"], "a-new-password-1")
    assert (await viewer.get("/api/v1/auth/me")).status_code == 200
    unknown = await client.patch("/api/v1/users/user_nosuch", json={"role": "admin"})
    assert unknown.status_code == 404
    admin_id = (await client.get("/api/v1/auth/me")).json()["user_id"]
    for change in ({"disabled": True}, {"role": "viewer"}):
        itself = await client.patch(f"/api/v1/users/{admin_id}", json=change)
        assert itself.status_code == 409 and itself.json()["field"] == "user_id"


async def test_api_key_scopes_narrow_and_revocation(client: AsyncTestClient) -> None:
    read = (await client.post("/api/v1/api-keys", json={"name": "r", "scopes": ["read"]})).json()
    logs = (await client.post("/api/v1/api-keys", json={"name": "l", "scopes": ["logs"]})).json()
    bad = await client.post("/api/v1/api-keys", json={"name": "x", "scopes": ["root"]})
    assert bad.status_code == 400 and bad.json()["field"] == "scopes"
    as_read = {"Authorization": "", "X-API-Key": read["key"]}
    assert (await client.get("/api/v1/jobs", headers=as_read)).status_code == 200
    forbidden = await client.post("/api/v1/jobs", json={}, headers=as_read)
    assert forbidden.status_code == 403 and "operator" in forbidden.json()["detail"]
    as_logs = {"Authorization": "", "X-API-Key": logs["key"]}
    assert (await client.get("/api/v1/jobs", headers=as_logs)).status_code == 403
    posted = await client.post(
        "/api/v1/logs", json={"job_id": "job_nosuch", "message": "hi"}, headers=as_logs
    )
    assert posted.status_code == 404  # past the key guard: the job is unknown
    revoked = await client.delete(f"/api/v1/api-keys/{read['key_id']}")
    assert revoked.status_code == 204
    gone = await client.get("/api/v1/jobs", headers=as_read)
    assert gone.status_code == 401
    wrong = {"X-API-Key": read["key"]}
    log_refused = await client.post(
        "/api/crawler/log", json={"job_id": "j", "message": "m"}, headers=wrong
    )
    assert log_refused.status_code == 403 and "Invalid API key" in log_refused.text


async def test_without_users_or_admin_password_the_api_does_not_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    app = create_app(
        ApiConfig(nats_url=nats_server.url, db_path=tmp_path / "r.db", identity=IdentityConfig())
    )
    with pytest.raises(BaseException) as raised:
        async with AsyncTestClient(app=app):
            pass
    assert "TB_ADMIN_PASSWORD" in repr(raised.value) or "TB_ADMIN_PASSWORD" in str(
        getattr(raised.value, "exceptions", "")
    )


async def test_an_expired_session_answers_401_and_its_socket_hears_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    identity = IdentityConfig(
        admin_password=ADMIN_PASSWORD,
        sessions=SessionPolicy(max_age=2.0, idle=60.0, grace=1.0),
        clean_every=0.2,
    )
    async with served(api_config(nats_server, tmp_path, identity=identity)) as base:
        ws_url = base.replace("http", "ws") + "/ws"
        headers = await bearer(base)
        token = headers["Authorization"].removeprefix("Bearer ")
        async with asyncio.timeout(20):
            # one socket with the header, one that sends its token first
            async with (
                connect(ws_url, additional_headers=headers) as by_header,
                connect(ws_url) as by_message,
            ):
                await by_message.send(json.dumps({"type": "auth", "token": token}))
                started = time.monotonic()
                for ws in (by_header, by_message):
                    message = json.loads(await ws.recv())
                    while message["type"] != "sessionExpired":
                        message = json.loads(await ws.recv())
                assert time.monotonic() - started < 4
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/api/v1/jobs", headers=headers)).status_code == 401
            for first in (json.dumps({"type": "auth", "token": token}), b"\x00", "{}"):
                async with connect(ws_url) as refused:  # an ended token, bytes, no token
                    await refused.send(first)
                    await refused.wait_closed()
                    assert refused.close_code == 1008
                    assert "not authenticated" in (refused.close_reason or "")
    expired = await user_events(nats_server.url, "SessionExpired")
    assert [e.reason for e in expired] == ["absolute"]


async def test_logout_and_revocation_hold_on_the_other_replica_within_a_second(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from tests.test_api_replicas import replica, token_of

    async with (
        replica(nats_server.url, tmp_path / "a.db") as a,
        replica(nats_server.url, tmp_path / "b.db", token_of(a)) as b,
    ):
        assert (await b.get("/api/v1/jobs")).status_code == 200
        key = (await a.post("/api/v1/api-keys", json={"name": "k"})).json()["key"]
        with_key = {"X-API-Key": key, "Authorization": ""}
        assert (await b.get("/api/v1/jobs", headers=with_key)).status_code == 200
        key_id = key.split(".")[1]
        assert (await a.delete(f"/api/v1/api-keys/{key_id}")).status_code == 204
        assert (await a.post("/api/v1/auth/logout")).status_code == 204
        started = time.monotonic()
        while (await b.get("/api/v1/jobs")).status_code != 401:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.02)
        while (await b.get("/api/v1/jobs", headers=with_key)).status_code != 401:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.02)


@pytest.mark.slow  # a real Chromium starts and stops
async def test_the_dashboard_logs_in_shows_the_plan_and_returns_to_login_when_the_session_ends(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    from agents.browser import launch_chromium

    async with served(api_config(nats_server, tmp_path)) as base, async_playwright() as pw:
        browser = await launch_chromium(pw)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/")
            await page.fill("#login input[name=username]", "admin")
            await page.fill("#login input[name=password]", "wrong password!")
            await page.click("#login button")
            await page.locator("#login-error", has_text="wrong").wait_for()
            await page.fill("#login input[name=password]", ADMIN_PASSWORD)
            await page.click("#login button")
            await page.locator("#conn", has_text="live").wait_for()
            await page.locator("#who", has_text="admin (admin)").wait_for()
            assert await page.locator("#features li").count() >= 1
            # a login elsewhere ends the page's session: the page is told and asks again
            await bearer(base)
            await page.locator("#login-error", has_text="session has ended").wait_for(timeout=5000)
            assert await page.locator("#main").is_hidden()
        finally:
            await browser.close()


async def test_sse_streams_end_with_session_expired_when_their_session_ends(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async def last_event(http: httpx.AsyncClient, path: str, ready: asyncio.Event) -> str:
        event = ""
        async with http.stream("GET", path) as stream:
            assert stream.status_code == 200
            ready.set()
            async for line in stream.aiter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
        return event

    async with served(api_config(nats_server, tmp_path)) as base, asyncio.timeout(20):
        headers = await bearer(base)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as http:
            job_id = (await http.post("/api/crawler/start", json={})).json()["job_id"]
            paths = (f"/api/v1/jobs/{job_id}/events/stream", f"/api/v1/jobs/{job_id}/logs/stream")
            opened = [asyncio.Event() for _ in paths]
            streams = [
                asyncio.create_task(last_event(http, path, ready))
                for path, ready in zip(paths, opened, strict=True)
            ]
            for ready in opened:
                await ready.wait()
            assert (await http.post("/api/v1/auth/logout")).status_code == 204
            assert await asyncio.gather(*streams) == ["sessionExpired", "sessionExpired"]


async def test_two_logins_at_once_on_two_replicas_leave_one_session(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from tests.test_api_replicas import replica

    async with (
        replica(nats_server.url, tmp_path / "a.db") as a,
        replica(nats_server.url, tmp_path / "b.db", "none yet") as b,
    ):
        await asyncio.gather(log_in(a), log_in(b))
        started = time.monotonic()
        while True:
            codes = sorted(
                [
                    (await a.get("/api/v1/jobs")).status_code,
                    (await b.get("/api/v1/jobs")).status_code,
                ]
            )
            if codes == [200, 401]:
                break
            assert codes != [401, 401]
            assert time.monotonic() - started < 1.0, codes
            await asyncio.sleep(0.02)
