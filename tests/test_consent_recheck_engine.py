"""The engine process re-verifies consents on its own, every TB_CONSENT_RECHECK."""

from __future__ import annotations

import asyncio
import os
import sys

from engine.bus import Bus
from engine.consent import ConsentCommands
from schemas import subjects
from schemas.events import ConsentRevoked
from tests.conftest import NatsServer
from tests.harness import log_until
from tests.sites import recording_site


async def test_the_engine_revokes_a_consent_whose_token_was_taken_down(
    bus: Bus, nats_server: NatsServer
) -> None:
    consents = ConsentCommands(bus)
    token, _ = await consents.claim("127.0.0.1", "owner")
    with recording_site(token=token) as site:
        await consents.verify("127.0.0.1", site.base_url, "owner")
        engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "engine", "--nats-url", nats_server.url,
            env={**os.environ, "TB_CONSENT_RECHECK": "1"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            site.token = None
            history = await log_until(
                bus,
                subjects.consent_stream_filter("127.0.0.1"),
                lambda e: isinstance(e.event, ConsentRevoked),
                timeout=30,
            )
        finally:
            engine.terminate()
            await engine.wait()
    revoked = history[-1].event
    assert isinstance(revoked, ConsentRevoked)
    assert (revoked.reason, revoked.actor) == ("token removed", "system")
    checks = [path for path, _ in site.requests if path == "/.well-known/trafficbuster.txt"]
    assert len(checks) >= 2  # the verification, then the engine's recheck
