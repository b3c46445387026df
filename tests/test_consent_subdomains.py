"""A domain verified by DNS with include_subdomains covers its subdomains end to end:
their jobs run on it, and revoking it stops their flows in the runners."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agents.runner import Runner
from engine.bus import Bus
from engine.consent.dns_txt import TxtLookup
from engine.consent.service import ConsentCommands, ConsentPolicy
from schemas import subjects
from schemas.events import FlowStarted, JobPaused
from schemas.values import Target
from tests.conftest import NatsServer
from tests.dns_server import dns_server
from tests.harness import SteadyExecutor, embedded, log_until


async def test_revoking_a_parent_that_covers_subdomains_stops_their_flows(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    with dns_server() as dns:
        consents = ConsentCommands(bus, policy=ConsentPolicy(dns=TxtLookup(dns.address)))
        token, _ = await consents.claim("a.test", "owner", include_subdomains=True)
        dns.records["_trafficbuster.a.test"] = [token]
        await consents.verify("a.test", None, "owner", method="dns")
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        runner = Runner(bus, SteadyExecutor(60.0), slots=2)
        tb.run(runner.run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://shop.a.test:9/", flows=4)], instance_count=2
        )
        job_log = [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")]
        seen = await log_until(
            bus,
            job_log,
            lambda e: isinstance(e.event, FlowStarted) and e.event.flow_id.endswith("_1"),
            timeout=20,
        )
        assert sum(isinstance(e.event, FlowStarted) for e in seen) == 2
        await consents.revoke("a.test", "the owner withdrew", "owner")
        revoked = time.monotonic()
        await asyncio.wait_for(runner.wait_idle(), 5)
        stopped_after = time.monotonic() - revoked
        history = await log_until(bus, job_log, lambda e: isinstance(e.event, JobPaused))
    paused = history[-1].event
    assert isinstance(paused, JobPaused) and paused.reason == "consent revoked for shop.a.test"
    assert stopped_after < 2.0
