from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import settings

from cli.nats_server import start_nats_server, start_nats_server_on_any_port
from engine.bus import Bus, BusConfig
from engine.identity import passwords

# Hypothesis fails an example that took over 200 ms, a measure of the machine more than of
# the code here: the tests run in several processes on a shared CPU, and on a busy one
# an example may wait that long for its turn.
settings.register_profile("shared-cpu", deadline=None)
settings.load_profile("shared-cpu")


class HashedOnce(PasswordHasher):
    """The production hasher, argon2id at the same cost, that hashes each password once in
    this process and hands out that hash again. The tests make the same users with the
    same passwords hundreds of times, at tens of milliseconds of CPU a hash by design;
    verifying a password still does the whole work every time."""

    hashes: dict[str | bytes, str]

    def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
        if salt is not None:
            return super().hash(password, salt=salt)
        if password not in self.hashes:
            self.hashes[password] = super().hash(password)
        return self.hashes[password]


@pytest.fixture(autouse=True, scope="session")
def each_password_hashed_once() -> Iterator[None]:
    hasher = HashedOnce.from_parameters(passwords._hasher._parameters)
    hasher.hashes = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "_hasher", hasher)
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """A real nats-server; the first start lets it pick a free port, restarts reuse it."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.port:
            self.proc = await start_nats_server(self.port, self.store)
        else:
            self.proc, self.port = await start_nats_server_on_any_port(self.store)

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
def bus_config() -> BusConfig:
    return BusConfig(ack_wait=3.0, presence_ttl=3.0)


@pytest.fixture
async def bus(nats_server: NatsServer, bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_server.url, name="test", config=bus_config)
    await b.provision()
    yield b
    await b.close()
