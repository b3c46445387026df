"""An expired consent is a revoked one: its flows end, its jobs pause saying so."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from agents.runner import Runner
from engine.bus import Bus
from engine.consent.service import ConsentCommands, ConsentPolicy
from schemas import subjects
from schemas.events import CONSENT_REVOKED, FlowFailed, FlowStarted, JobPaused
from schemas.ids import utcnow
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, embedded, log_until
from tests.sites import recording_site

HOST = "127.0.0.1"


async def test_flows_end_and_the_job_pauses_when_its_consent_expires(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    short = ConsentCommands(bus, policy=ConsentPolicy(validity=timedelta(seconds=3)))
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        runner = Runner(bus, SteadyExecutor(60.0), slots=2)
        tb.run(runner.run(), "runner")
        token, _ = await short.claim(HOST, "owner")
        with recording_site(HOST, token=token) as site:
            given, _ = await short.verify(HOST, site.base_url, "owner")
        job_id = await tb.create_job([Target(url=f"http://{HOST}:9/", flows=4)], instance_count=2)
        job_log = [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")]
        started = 0

        def two_started(env: object) -> bool:
            nonlocal started
            started += isinstance(getattr(env, "event", None), FlowStarted)
            return started == 2

        await log_until(bus, job_log, two_started, timeout=20)
        assert utcnow() < given.expires_at  # both run on a valid consent
        async with asyncio.timeout(15):
            await runner.wait_until(lambda: not runner.runs and utcnow() >= given.expires_at)
        stopped_after = (utcnow() - given.expires_at).total_seconds()
        history = await log_until(bus, job_log, lambda e: isinstance(e.event, JobPaused))
    paused = history[-1].event
    assert isinstance(paused, JobPaused) and paused.reason == f"consent expired for {HOST}"
    failed = [e.event for e in history if isinstance(e.event, FlowFailed)]
    assert len(failed) == 2 and all(f.reason == CONSENT_REVOKED and not f.retryable for f in failed)
    assert stopped_after < 2.0, stopped_after
