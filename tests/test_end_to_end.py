"""The whole write and read path on a real nats-server, with real Chromium where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agents.executor import NoopExecutor
from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from engine.bus import Bus
from schemas import VERSION, subjects
from schemas.events import FlowDispatched, FlowDone
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import embedded
from tests.sites import recording_site

PAGES = {
    "/": '<html><body style="height:3000px"><a href="/a">A</a> <a href="/b">B</a>'
    ' <a href="http://127.0.0.2:9/away">away</a></body></html>',
    "/a": '<html><body style="height:3000px"><a href="/">home</a> <a href="/b">B</a></body></html>',
    "/b": '<html><body style="height:3000px"><a href="/">home</a> <a href="/a">A</a></body></html>',
}


async def flow_done_ids(bus: Bus, job_id: str) -> tuple[set[str], int]:
    ids: set[str] = set()
    events = 0
    async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowDone"), follow=False):
        for env in batch:
            assert isinstance(env.event, FlowDone)
            ids.add(env.event.flow_id)
            events += 1
    return ids, events


@pytest.mark.slow
async def test_job_in_real_chromium_completes_counting_each_flow_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    with recording_site(pages=PAGES) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=3)
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [
                    Target(url=f"{site.base_url}/", flows=4, clicks=2),
                    Target(url=f"{site.base_url}/a", flows=2, clicks=1),
                ],
                instance_count=3,
                session_seconds=0.5,
            )
            view = await tb.wait_terminal(job_id, timeout=90)
            runner.stop()
    assert view.status == "completed", view
    assert (view.flows_total, view.flows_done, view.flows_failed) == (6, 6, 0)
    assert [(t.flow_done, t.flow_target) for t in view.targets] == [(4, 4), (2, 2)]
    assert [(t.click_done, t.click_target) for t in view.targets] == [(8, 8), (2, 2)]
    ids, _ = await flow_done_ids(bus, job_id)
    assert len(ids) == 6
    # identifiable traffic: every request the site saw carries the job id and the UA suffix
    browsed = [headers for path, headers in site.requests if path != "/favicon.ico"]
    assert browsed
    assert all(h.get("x-trafficbuster") == job_id for h in browsed)
    assert all(h["user-agent"].endswith(f" TrafficBuster/{VERSION}") for h in browsed)


async def test_unverified_host_is_refused_and_never_contacted(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    with recording_site("127.0.0.2", pages=PAGES) as unverified:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1")
            tb.run(Runner(bus, PlaywrightExecutor(VERSION), slots=1).run(), "runner")
            job_id = await tb.create_job(
                [
                    Target(url="http://127.0.0.1:9/", flows=1),
                    Target(url=f"{unverified.base_url}/", flows=3, clicks=1),
                ],
                instance_count=2,
                session_seconds=0,
            )
            view = await tb.wait_terminal(job_id)
    assert view.status == "refused"
    assert view.reason is not None and "127.0.0.2" in view.reason
    assert view.flows_done == 0
    assert unverified.requests == []
    dispatched = [
        env
        async for batch in bus.read(1, "tb.dispatch.>", follow=False)
        for env in batch
        if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id
    ]
    assert dispatched == []


@pytest.mark.slow  # kills a real runner process and waits out its ack wait
async def test_runner_sigkilled_mid_job_another_finishes_it_counting_each_flow_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 10
    with recording_site(pages=PAGES) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            first = await tb.spawn_runner("--slots", "3", "--runner-id", "runner_first")
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=flows, clicks=1)],
                instance_count=3,
                session_seconds=1.5,
            )
            # kill while flows are in flight: some done, the rest started or queued
            await tb.wait_job(job_id, lambda v: v.flows_done >= 2, timeout=90)
            first.send_signal(signal.SIGKILL)
            await first.wait()
            killed_at = await tb.job(job_id)
            assert killed_at is not None and killed_at.flows_done < flows
            await tb.spawn_runner("--slots", "3", "--runner-id", "runner_second")
            view = await tb.wait_terminal(job_id, timeout=120)
    assert view.status == "completed", view
    assert view.flows_done == flows and view.flows_failed == 0
    assert view.targets[0].flow_done == flows
    ids, events = await flow_done_ids(bus, job_id)
    assert ids == {f"{job_id}_0_{n}" for n in range(flows)}
    assert events >= flows  # duplicates may sit in the stream, never in the counts


@pytest.mark.slow
async def test_replay_rebuilds_identical_tables(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    from projections.replay import dump_tables

    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        runner = Runner(bus, NoopExecutor(), slots=8)
        tb.run(runner.run(), "runner")
        done = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=30, clicks=2)],
            instance_count=8,
            session_seconds=0,
        )
        refused = await tb.create_job([Target(url="http://127.0.0.3:9/", flows=2)])
        await tb.wait_terminal(done)
        await tb.wait_terminal(refused)
        runner.stop()
        await asyncio.wait_for(asyncio.gather(*tb.tasks[1:], return_exceptions=True), 30)
        await tb.projector.wait_for(await bus.last_seq(), timeout=10)
        await tb.projector.stop()
    before = await dump_tables(tb.db_path)
    assert before["jobs"] and before["flows"]
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tb.db_path}{suffix}").unlink(missing_ok=True)
    rebuilt = await replay_cli(nats_server.url, tb.db_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt" in rebuilt.stdout
    assert await dump_tables(tb.db_path) == before
    verified = await replay_cli(nats_server.url, tb.db_path, "--verify")
    assert verified.returncode == 0 and "matches" in verified.stdout
    with contextlib.closing(sqlite3.connect(tb.db_path)) as db, db:
        db.execute("UPDATE jobs SET flows_done = flows_done + 1 WHERE job_id = ?", (done,))
    tampered = await replay_cli(nats_server.url, tb.db_path, "--verify")
    assert tampered.returncode == 1 and "DIFFERS" in tampered.stdout


async def test_cancel_stops_in_flight_flows_within_a_second(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    from engine.jobs.decider import CancelJob

    with recording_site(pages=PAGES) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=2)
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=6)], instance_count=2, session_seconds=30
            )
            async with asyncio.timeout(30):
                async for batch in bus.read(1, subjects.flow_subject(job_id, "PageVisited")):
                    if batch:
                        break  # a flow is in its 30 s session now
            cancelled = await tb.jobs.execute(CancelJob(job_id), "test")
            loop = asyncio.get_running_loop()
            asked = loop.time()
            await asyncio.wait_for(runner.wait_idle(), 5)
            stopped_after = loop.time() - asked
            view = await tb.wait_job(job_id, lambda v: v.status == "cancelled", timeout=10)
    assert cancelled.seq > 0
    assert stopped_after < 1.0
    assert view.flows_done == 0


async def replay_cli(url: str, db: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli.main", "replay", "--nats-url", url, "--db", str(db), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
