"""Fixtures for API tests: the Litestar app in-process on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus, BusConfig
from schemas import subjects
from schemas.presence import RunnerPresence
from tests.conftest import NatsServer

Online = Callable[..., Awaitable[None]]

JOB = {
    "name": "j",
    "targets": [{"url": "http://127.0.0.1:9/", "flows": 2, "clicks": 1}],
    "settings": {"instance_count": 1, "session_seconds": 0},
}


@pytest.fixture
async def client(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[AsyncTestClient]:
    app = create_app(
        ApiConfig(
            nats_url=nats_server.url, db_path=tmp_path / "read.db", bus=BusConfig(presence_ttl=30)
        )
    )
    async with AsyncTestClient(app=app) as c:
        yield c


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
