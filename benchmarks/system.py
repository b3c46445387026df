"""A whole local system for benchmarks: nats-server, an authorised loopback site, the
engine and a runner as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cli.nats_server import start_nats_server
from engine.bus import Bus, BusConfig
from engine.consent import ConsentCommands
from schemas.values import ConsentCaps
from tests.conftest import free_port
from tests.sites import RecordingSite, recording_site

UNCAPPED = ConsentCaps(max_concurrent=10_000, max_flows_per_minute=1_000_000)


@dataclass
class LocalSystem:
    bus: Bus
    url: str  # nats
    site: RecordingSite
    engine: asyncio.subprocess.Process
    runner: asyncio.subprocess.Process


@asynccontextmanager
async def local_system(
    runner_args: list[str], pages: dict[str, str] | None = None
) -> AsyncIterator[LocalSystem]:
    """Start everything; the site's host is verified (without caps) before the engine starts."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        nats = await start_nats_server(port, Path(tmp) / "js")
        url = f"nats://127.0.0.1:{port}"
        env = {**os.environ, "TB_LOG_LEVEL": "warning"}
        procs: list[asyncio.subprocess.Process] = []
        try:
            bus = await Bus.connect(url, name="bench", config=BusConfig())
            await bus.provision()
            consents = ConsentCommands(bus)
            with recording_site() as site:
                token, _ = await consents.claim(site.host, "bench")
            with recording_site(pages=pages, token=token) as site:
                await consents.verify(site.host, site.base_url, "bench", caps=UNCAPPED)
                for args in (["engine", "--nats-url", url], ["runner", "--nats-url", url]):
                    procs.append(
                        await asyncio.create_subprocess_exec(
                            sys.executable,
                            "-m",
                            "cli.main",
                            *args,
                            *(runner_args if args[0] == "runner" else []),
                            env=env,
                            stdout=asyncio.subprocess.DEVNULL,
                            stderr=asyncio.subprocess.DEVNULL,
                        )
                    )
                yield LocalSystem(bus, url, site, procs[0], procs[1])
            await bus.close()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
            nats.kill()
            await nats.wait()
