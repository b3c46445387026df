"""Attacks on identity that once went through."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from websockets.asyncio.client import connect

from engine.bus import Bus
from engine.errors import Conflict
from engine.identity.service import UserCommands
from tests.api_client import ADMIN_PASSWORD, api_config, bearer, client, served
from tests.conftest import NatsServer

__all__ = ["client"]

LOGIN = "/api/v1/auth/login"


EVIL_USER = '{"username":"evil","password":"passwordpass=word12345","role":"admin"}'


async def cookie_only(client: AsyncTestClient) -> AsyncTestClient:
    """A client that carries the admin's session as the dashboard's cookie, and nothing else."""
    r = await client.post(
        "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert r.status_code == 200, r.text
    browser = AsyncTestClient(app=client.app, base_url="http://tb.example:8000")
    browser.blocking_portal = client.blocking_portal
    browser.cookies.set("tb_session", r.json()["token"])
    return browser


async def test_the_session_cookie_changes_nothing_for_a_page_of_another_origin(
    client: AsyncTestClient,
) -> None:
    # a page on another port of the same host is same-site: the browser sends the
    # SameSite=Strict cookie with its form post (text/plain needs no CORS preflight)
    browser = await cookie_only(client)
    for origin in ("http://tb.example:9999", "null", None):
        headers = {"content-type": "text/plain"} | ({"origin": origin} if origin else {})
        r = await browser.post("/api/v1/users", content=EVIL_USER, headers=headers)
        assert r.status_code == 403, (origin, r.text)
        assert "origin" in r.json()["detail"].lower()
        logout = await browser.post("/api/v1/auth/logout", headers=headers)
        assert logout.status_code == 403, (origin, logout.text)
    # the dashboard's own page, and reads, still ride the cookie
    assert (await browser.get("/api/v1/users")).status_code == 200
    own = {"origin": "http://tb.example:8000"}
    made = await browser.post("/api/v1/api-keys", json={"name": "dash"}, headers=own)
    assert made.status_code == 201, made.text
    # an explicit credential is no browser's ambient one: no Origin needed
    key = {"X-API-Key": made.json()["key"]}
    assert (await browser.post("/api/v1/consents", json={}, headers=key)).status_code == 400


@pytest.mark.parametrize("removal", ["demote", "disable"])
async def test_two_admins_removing_each_other_at_once_leave_an_admin(
    bus: Bus, removal: str
) -> None:
    users = UserCommands(bus)
    first, second = [
        (await users.create(name, "a-long-password", "admin", actor="system")).user_id
        for name in ("first", "second")
    ]

    async def remove(user_id: str, actor: str) -> str:
        try:
            if removal == "demote":
                await users.change_role(user_id, "viewer", actor)
            else:
                await users.disable(user_id, actor)
        except Conflict as refused:
            return refused.rule
        return "done"

    outcomes = await asyncio.gather(remove(second, first), remove(first, second))
    assert sorted(outcomes)[0] == "done" and "last admin" in sorted(outcomes)[1], outcomes
    left = [await users.load(u) for u in (first, second)]
    assert [u.user_id for u in left if u.role == "admin" and not u.disabled] != []
    # an admin with no other beside them stays one, whoever asks
    last = next(u.user_id for u in left if u.role == "admin" and not u.disabled)
    assert "last admin" in await remove(last, "system")


@pytest.mark.parametrize("ending", ["revoke the key", "disable the user"])
async def test_a_socket_opened_with_an_api_key_closes_when_the_key_stops_working(
    nats_server: NatsServer, tmp_path: Path, ending: str
) -> None:
    async with served(api_config(nats_server, tmp_path)) as base, asyncio.timeout(20):
        admin_headers = await bearer(base)
        async with httpx.AsyncClient(base_url=base, headers=admin_headers) as admin:
            user = {"username": "scripted", "password": "scripted-password", "role": "viewer"}
            user_id = (await admin.post("/api/v1/users", json=user)).json()["user_id"]
            async with httpx.AsyncClient(base_url=base) as http:
                credentials = {"username": "scripted", "password": "scripted-password"}
                login = await http.post("/api/v1/auth/login", json=credentials)
                token = {"Authorization": f"Bearer {login.json()['token']}"}
                made = await http.post("/api/v1/api-keys", json={"name": "ws"}, headers=token)
            key = made.json()
            async with connect(
                base.replace("http", "ws") + "/ws", additional_headers={"X-API-Key": key["key"]}
            ) as socket:
                if ending == "revoke the key":
                    r = await admin.delete(f"/api/v1/api-keys/{key['key_id']}")
                else:
                    r = await admin.patch(f"/api/v1/users/{user_id}", json={"disabled": True})
                assert r.status_code in (200, 204), r.text
                async with asyncio.timeout(3):
                    message = json.loads(await socket.recv())
                    while message["type"] != "sessionExpired":
                        message = json.loads(await socket.recv())
                await socket.wait_closed()
                assert socket.close_code == 1008


async def test_the_crawler_routes_are_no_open_door_without_an_ingest_key(
    client: AsyncTestClient,
) -> None:
    """Without TB_INGEST_API_KEY, a client elsewhere (not loopback) with no credential,
    or a viewer, may not open, cancel or read external jobs; an operator's session or key
    may."""
    anonymous = AsyncTestClient(app=client.app)  # its address is no loopback one
    anonymous.blocking_portal = client.blocking_portal
    job_id = (await client.post("/api/crawler/start", json={"name": "mine"})).json()["job_id"]
    for method, path in (
        ("POST", "/api/crawler/start"),
        ("POST", f"/api/crawler/cancel/{job_id}"),
        ("GET", f"/api/crawler/status/{job_id}"),
        ("GET", f"/api/crawler/logs/{job_id}"),
    ):
        r = await anonymous.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 403 and "Invalid API key" in r.text, (path, r.text)
    viewer = await client.post(
        "/api/v1/users",
        json={"username": "watcher", "password": "watcher-password", "role": "viewer"},
    )
    assert viewer.status_code == 201
    login = await anonymous.post(
        "/api/v1/auth/login", json={"username": "watcher", "password": "watcher-password"}
    )
    as_viewer = {"Authorization": f"Bearer {login.json()['token']}"}
    anonymous.cookies.clear()
    key = await anonymous.post("/api/v1/api-keys", json={"name": "k"}, headers=as_viewer)
    with_key = {"X-API-Key": key.json()["key"]}
    for headers in (as_viewer, with_key):
        r = await anonymous.post("/api/crawler/start", json={}, headers=headers)
        assert r.status_code == 403, r.text
        r = await anonymous.post(
            "/api/v1/logs", json={"job_id": job_id, "message": "x"}, headers=headers
        )
        assert r.status_code == 403, r.text
    cancelled = await client.post(f"/api/crawler/cancel/{job_id}")
    assert cancelled.status_code == 200, cancelled.text


async def test_a_wrong_password_costs_the_same_work_for_a_known_and_an_unknown_name(
    client: AsyncTestClient,
) -> None:
    """Timing tells whether a name exists when one of the two does more round trips to
    NATS: count the reads of user histories each login makes."""
    users = client.app.state.identity.users
    reads: list[str] = []
    load = users.load

    async def counted(user_id: str) -> Any:
        reads.append(user_id)
        return await load(user_id)

    users.load = counted
    counts = []
    for name in ("admin", "nobody-here"):
        reads.clear()
        r = await client.post(LOGIN, json={"username": name, "password": "a wrong password"})
        assert r.status_code == 401
        counts.append(len(reads))
    assert counts[0] == counts[1], counts


async def test_attacks_that_hold_credentials_of_one_world_open_nothing_in_another(
    client: AsyncTestClient,
) -> None:
    """Kept as a fence: each of these was tried and refused."""
    anonymous = AsyncTestClient(app=client.app)
    anonymous.blocking_portal = client.blocking_portal
    runner = (await client.post("/api/v1/runners/keys", json={"name": "r"})).json()["key"]
    user_key = (await client.post("/api/v1/api-keys", json={"name": "u"})).json()["key"]
    token = str(client.headers["Authorization"]).removeprefix("Bearer ")
    # a runner key is no user credential, in any header
    for headers in (
        {"X-API-Key": runner},
        {"Authorization": f"Bearer {runner}"},
        {"X-Runner-Key": runner},
    ):
        assert (await anonymous.get("/api/v1/jobs", headers=headers)).status_code == 401
    # a user's key or token is no runner key
    platform = {"os": "linux", "browser": "chromium"}
    for credential in (user_key, token):
        r = await anonymous.post(
            "/api/v1/runners/credentials", json=platform, headers={"X-Runner-Key": credential}
        )
        assert r.status_code == 403, r.text
    # malformed, huge or foreign credentials: refused, never a 500
    for headers in (
        {"Authorization": "Bearer " + "a" * 60_000},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer tbk.."},
        {"X-API-Key": "tbk." + "a" * 5000 + ".b"},
        {"X-API-Key": "tbk.../..%00.x"},
        {"X-API-Key": b"tbk.key_x.\xe9\xff"},
        {"Cookie": "tb_session=" + "x" * 8000},
        {"Cookie": 'tb_session="unterminated'},
    ):
        r = await anonymous.get("/api/v1/jobs", headers=headers)
        assert r.status_code == 401, (headers.keys(), r.status_code)
    # path spellings reach the same guard, or no route at all
    for method, path in (
        ("GET", "/api/v1/users/"),
        ("GET", "/api/v1//users"),
        ("GET", "/api/v1/users%2F"),
        ("OPTIONS", "/api/v1/users"),
    ):
        assert (await anonymous.request(method, path)).status_code == 401, path
    for method, path in (("GET", "/API/v1/users"), ("GET", "/api/v1/jobs/..%2Fusers")):
        assert (await anonymous.request(method, path)).status_code == 404, path
    # nothing secret echoed back in an error
    r = await anonymous.post(LOGIN, json={"username": "admin", "password": "SECRET" * 1000})
    assert r.status_code == 400 and "SECRET" not in r.text


async def test_a_page_in_a_browser_on_the_api_host_gets_no_loopback_trust(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Without TB_INGEST_API_KEY loopback clients may use the crawler routes: a worker on
    the machine. A browser on that machine is a loopback client too, and any page it
    shows may post there (text/plain, no preflight), or read there once its name is
    rebound to 127.0.0.1; a browser's request says it is one (Origin, Sec-Fetch-*),
    which no worker does."""
    async with (
        served(api_config(nats_server, tmp_path)) as base,
        asyncio.timeout(20),
        httpx.AsyncClient(base_url=base) as local,
    ):
        worker = await local.post("/api/crawler/start", json={})
        assert worker.status_code == 200, worker.text
        job_id = worker.json()["job_id"]
        page = {"origin": "http://evil.example", "content-type": "text/plain"}
        for path, body in (
            ("/api/crawler/start", "{}"),
            (f"/api/crawler/cancel/{job_id}", ""),
            ("/api/crawler/log", json.dumps({"job_id": job_id, "message": "x"})),
        ):
            r = await local.post(path, content=body, headers=page)
            assert r.status_code == 403, (path, r.text)
        # a page whose name was rebound to this address: its Origin is the Host
        rebound = {"origin": base, "content-type": "text/plain"}
        r = await local.post(f"/api/crawler/cancel/{job_id}", headers=rebound)
        assert r.status_code == 403, r.text
        read = await local.get(
            f"/api/crawler/status/{job_id}", headers={"sec-fetch-site": "same-origin"}
        )
        assert read.status_code == 403, read.text
        # the dashboard's operator, with their session: let in as themselves
        operator = {"origin": base} | await bearer(base)
        r = await local.post(f"/api/crawler/cancel/{job_id}", headers=operator)
        assert r.status_code == 200, r.text


async def test_names_differing_in_case_are_one_user_for_creation_and_throttling(
    client: AsyncTestClient,
) -> None:
    made = await asyncio.gather(
        *(
            client.post(
                "/api/v1/users",
                json={"username": name, "password": "a-long-password", "role": "viewer"},
            )
            for name in ("Bob", "bob", "BOB")
        )
    )
    assert sorted(r.status_code for r in made) == [201, 409, 409], [r.text for r in made]
    client.app.state.identity.clock = lambda: 1_000_000.0  # no wait runs out
    codes = []
    for name in ("Bob", "bOb", "boB", "BOb", "bob"):
        r = await client.post(LOGIN, json={"username": name, "password": "a wrong password"})
        codes.append(r.status_code)
    assert codes == [401, 401, 401, 401, 429], codes
