"""Consent with real Chromium: re-verification that finds the token gone stops every flow
within 2 s, and a domain's cap on concurrent sessions holds across jobs, as the site sees
it (counted by X-TrafficBuster-Flow)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from engine.bus import Bus
from engine.consent.finding import Found
from schemas import VERSION, subjects
from schemas.consent_state import ConsentStatus
from schemas.events import CONSENT_REVOKED, FlowDispatched, FlowDone, FlowFailed, JobPaused
from schemas.values import ConsentCaps, Target
from tests.conftest import NatsServer
from tests.flow_site import FlowSite, flow_site
from tests.harness import Embedded, embedded, log_until

HOST = "127.0.0.1"
QUIET = 2.0  # seconds the site must hear nothing more once the flows stopped


@contextlib.asynccontextmanager
async def browsing(
    bus: Bus, nats_url: str, tmp_path: Path, site: FlowSite, slots: int, caps: ConsentCaps
) -> AsyncIterator[tuple[Embedded, Runner]]:
    """The system with a Chromium runner of ``slots``, the site's host verified on it."""
    async with embedded(bus, nats_url, tmp_path) as tb:
        token, _ = await tb.consents.claim(HOST, "owner")
        site.token = token
        await tb.consents.verify(HOST, site.base_url, "owner", caps=caps)
        runner = Runner(bus, PlaywrightExecutor(VERSION), slots=slots)
        tb.run(runner.run(), "runner")
        yield tb, runner


@pytest.mark.slow
async def test_a_removed_token_found_by_recheck_stops_every_flow_within_two_seconds(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    with flow_site(HOST, delay=0.05) as site:
        async with browsing(bus, nats_server.url, tmp_path, site, 3, ConsentCaps()) as (tb, runner):
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=9, clicks=3)],
                instance_count=3,
                session_seconds=60,
            )
            async with asyncio.timeout(60):
                await runner.wait_until(lambda: len(runner.runs) == 3)
                while len(site.first_seen) < 3:  # each of the three flows reached the site
                    site.arrived.clear()
                    await asyncio.to_thread(site.arrived.wait, 1.0)
            site.token = None  # the owner takes the token down
            loop = asyncio.get_running_loop()
            asked = time.monotonic()
            result = await tb.consents.recheck(HOST)
            revoked_at = time.monotonic()
            await asyncio.wait_for(runner.wait_idle(), 5)
            stopped = time.monotonic()
            before = set(site.first_seen)
            job_log = [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")]
            history = await log_until(bus, job_log, lambda e: isinstance(e.event, JobPaused))
            view = await tb.wait_job(job_id, lambda v: v.status == "paused", timeout=10)
            # nothing more reaches the site: no request of a running flow, no new session
            site.arrived.clear()
            heard = await loop.run_in_executor(None, site.arrived.wait, QUIET)
            dispatched = [
                env.event
                async for batch in bus.read(1, subjects.ALL_DISPATCH, follow=False)
                for env in batch
                if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id
            ]
            last_request = max(site.last_seen.values())
    assert (result.found, result.status, result.reason) == (
        Found.ABSENT,
        ConsentStatus.REVOKED,
        "token removed",
    )
    latency = stopped - revoked_at
    print(
        f"\nrevocation: recheck took {revoked_at - asked:.3f}s; every flow stopped"
        f" {latency:.3f}s after ConsentRevoked was stored; last request at the site"
        f" {last_request - revoked_at:+.3f}s from it"
    )
    assert latency < 2.0
    assert last_request - revoked_at < 2.0
    assert not heard and set(site.first_seen) == before  # no new session afterwards
    paused = history[-1].event
    assert isinstance(paused, JobPaused) and paused.reason == f"consent revoked for {HOST}"
    assert view.reason == f"consent revoked for {HOST}"
    ended = {
        e.event.flow_id
        for e in history
        if isinstance(e.event, FlowFailed) and e.event.reason == CONSENT_REVOKED
    }
    assert ended == {d.flow_id for d in dispatched}  # every flow in flight ended, none ran on
    assert len(dispatched) == 3


@pytest.mark.slow
async def test_two_jobs_never_have_more_sessions_on_a_domain_than_its_cap(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    capped = ConsentCaps(max_concurrent=2)
    with flow_site(HOST, delay=0.2) as site:
        async with browsing(bus, nats_server.url, tmp_path, site, 2, capped) as (tb, _):
            # a second runner: the cap holds across runners, not only within one
            tb.run(Runner(bus, PlaywrightExecutor(VERSION), slots=2).run(), "second runner")
            jobs = [
                await tb.create_job(
                    [Target(url=f"{site.base_url}/", flows=4, clicks=1)],
                    instance_count=4,
                    session_seconds=1,
                )
                for _ in range(2)
            ]
            views = [await tb.wait_terminal(job_id, timeout=120) for job_id in jobs]
            runners = {
                env.event.runner_id
                async for batch in bus.read(1, subjects.flow_subject("*", "FlowDone"), follow=False)
                for env in batch
                if isinstance(env.event, FlowDone)
            }
    assert [(v.status, v.flows_done) for v in views] == [("completed", 4), ("completed", 4)]
    assert len(site.first_seen) == 8 and site.unmarked == 0
    print(
        f"\ncaps: at most {site.most_at_once} flows with requests in flight at once,"
        f" {site.sessions_overlapping()} sessions overlapping (cap 2), on {len(runners)} runners"
    )
    assert site.most_at_once <= 2
    assert site.sessions_overlapping() <= 2
