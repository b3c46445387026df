"""Fixtures for API tests: the Litestar app in-process on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.services import ApiConfig, IdentityConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus, BusConfig
from schemas import subjects
from schemas.events import Role
from schemas.presence import RunnerPresence
from tests.conftest import NatsServer, free_port

Online = Callable[..., Awaitable[None]]

JOB = {
    "name": "j",
    "targets": [{"url": "http://127.0.0.1:9/", "flows": 2, "clicks": 1}],
    "settings": {"instance_count": 1, "session_seconds": 0},
}


ADMIN_PASSWORD = "admin-password-for-tests"
TEST_IDENTITY = IdentityConfig(admin_password=ADMIN_PASSWORD)
ClientAs = Callable[[Role], Awaitable[AsyncTestClient]]


def api_config(nats_server: NatsServer, tmp_path: Path, **overrides: Any) -> ApiConfig:
    """The API's settings for a test: this test's nats-server and read model, and the
    first admin's password."""
    settings: dict[str, Any] = {
        "nats_url": nats_server.url,
        "db_path": tmp_path / "read.db",
        "bus": BusConfig(presence_ttl=30),
        "identity": TEST_IDENTITY,
    }
    return ApiConfig(**(settings | overrides))


async def log_in(
    client: AsyncTestClient, username: str = "admin", password: str = ADMIN_PASSWORD
) -> str:
    """Log ``client`` in; its later requests carry the bearer token."""
    r = await client.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    token = str(r.json()["token"])
    client.headers["Authorization"] = f"Bearer {token}"
    client.cookies.clear()  # the bearer token alone says who calls
    return token


async def key_in(client: AsyncTestClient) -> None:
    """Log ``client`` in as the first admin and have it call with a new API key of theirs:
    another client's login (a second replica's, say) does not end a key."""
    await log_in(client)
    r = await client.post("/api/v1/api-keys", json={"name": "tests"})
    assert r.status_code == 201, r.text
    del client.headers["Authorization"]
    client.headers["X-API-Key"] = r.json()["key"]


async def bearer(base_url: str, password: str = ADMIN_PASSWORD) -> dict[str, str]:
    """Headers that authenticate as the first admin on the API served at ``base_url``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": password})
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['token']}"}


async def admin_key(base_url: str) -> dict[str, str]:
    """Headers with a new API key of the first admin (a key survives any later login or
    logout, where a session would not)."""
    headers = await bearer(base_url)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as http:
        r = await http.post("/api/v1/api-keys", json={"name": "tests"})
        assert r.status_code == 201, r.text
        return {"X-API-Key": r.json()["key"]}


@asynccontextmanager
async def served(config: ApiConfig) -> AsyncIterator[str]:
    """The API with ``config`` served by uvicorn on a free loopback port; yields its URL."""
    port = free_port()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for_port("127.0.0.1", port, timeout=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def client(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[AsyncTestClient]:
    """The API in-process, with a client logged in as the first admin."""
    app = create_app(api_config(nats_server, tmp_path))
    async with AsyncTestClient(app=app) as c:
        await log_in(c)
        yield c


@pytest.fixture
async def client_as(client: AsyncTestClient) -> AsyncIterator[ClientAs]:
    """Clients for the same app logged in as a new user of the given role."""
    opened: list[AsyncTestClient] = []

    async def as_role(role: Role) -> AsyncTestClient:
        name = f"{role}{len(opened)}"
        password = f"{name}-password-long"
        r = await client.post(
            "/api/v1/users", json={"username": name, "password": password, "role": role}
        )
        assert r.status_code == 201, r.text
        other = AsyncTestClient(app=client.app)
        other.blocking_portal = client.blocking_portal  # the same running app and loop
        opened.append(other)
        await log_in(other, name, password)
        return other

    yield as_role  # the clients share the app's portal, closed with ``client``


@pytest.fixture
async def runner_online(nats_server: NatsServer) -> AsyncIterator[Online]:
    """Write runner presence from this test's own connection (the app runs on another loop)."""
    bus = await Bus.connect(nats_server.url, name="test-runner")

    async def online(os: str = "linux") -> None:
        await put_presence(bus, os)

    yield online
    await bus.close()


def when_registered(registered: asyncio.Event) -> Callable[[str], None]:
    """A runner's ``announce``: sets ``registered`` once its presence is written."""

    def announce(line: str) -> None:
        if "Registered" in line:
            registered.set()

    return announce


async def put_presence(bus: Bus, os: str = "linux") -> None:
    """A runner's presence heartbeat, as a runner writes it."""
    kv = await bus.kv(subjects.RUNNERS_BUCKET)
    presence = RunnerPresence(runner_id=f"runner_{os}", os=os, browser="chromium", slots=2)
    await kv.put(presence.runner_id, msgspec.json.encode(presence))
