"""A real nats-server with authorization on, for tests: users made as ``tb up`` makes them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cli.nats_auth import AuthorizationOwner, LocalCredentials, NatsUser, render_config
from cli.nats_server import nats_server_config_args, wait_for_port
from engine.runner_keys import RunnerKeyRecord
from tests.conftest import free_port

LOCAL_PLATFORM = ("linux", "chromium")


@dataclass
class AuthorizedNats:
    """nats-server started from a configuration with users; ``reload`` rewrites it."""

    root: Path
    local_runners: int = 1
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    credentials: LocalCredentials = field(init=False)
    owner: AuthorizationOwner = field(init=False)

    def __post_init__(self) -> None:
        self.credentials = LocalCredentials(self.root / "nats", self.local_runners)
        self.config_path = self.root / "nats" / "nats-server.conf"
        self.owner = AuthorizationOwner(self._render, self.config_path, self.signal_reload)

    def _render(self, runner_users: list[NatsUser]) -> str:
        return render_config(
            host="127.0.0.1",
            port=self.port,
            store_dir=self.root / "jetstream",
            server_name=f"tb-authz-{id(self)}",
            users=self.credentials.users(LOCAL_PLATFORM) + runner_users,
        )

    def url(self, user: str) -> str:
        return self.credentials.url(user, "127.0.0.1", self.port)

    @property
    def bare_url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, records: Mapping[str, RunnerKeyRecord] | None = None) -> None:
        # a fixed port: a reload cannot change the port, so the configuration names it
        self.port = self.port or free_port()
        self.owner.applied = None
        self.owner.write(records or {})
        self.proc = await asyncio.create_subprocess_exec(
            *nats_server_config_args(self.config_path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_for_port("127.0.0.1", self.port)

    def signal_reload(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def authorized_nats(root: Path, local_runners: int = 1) -> AsyncIterator[AuthorizedNats]:
    server = AuthorizedNats(root, local_runners)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
