"""A runner's lifecycle on a real nats-server: failure screenshots, drains, crashes,
restarts of NATS, keepalives; real Chromium and real runner processes where it matters."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from agents.control import Admission
from agents.flow_run import Outcome
from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus
from schemas import VERSION, subjects
from schemas.events import FlowDispatched, FlowDone, FlowFailed, FlowStarted, PageVisited
from schemas.values import Target
from tests.api_client import TEST_IDENTITY, log_in
from tests.conftest import NatsServer
from tests.harness import WorkItemsSent, embedded, log_until
from tests.runner_proc import read_runs
from tests.sites import RecordingSite, recording_site
from tests.test_runner import (
    GatedExecutor,
    RecordingExecutor,
    dispatch,
    started_job,
    work_item,
)

pytestmark = pytest.mark.timeout(120)


@contextmanager
def failing_site(status: int = 500) -> Iterator[RecordingSite]:
    """A loopback site whose every page answers ``status`` with a visible body (its
    consent token aside, so a consent can be verified on its own port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/.well-known/trafficbuster.txt" and site.token is not None:
                code, body = 200, site.token.encode()
            else:
                code, body = status, b"<html><body><h1>Something broke</h1></body></html>"
            self.send_response(code)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    site = RecordingSite("127.0.0.1", server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()


async def flow_failures(bus: Bus, job_id: str) -> list[FlowFailed]:
    return [
        env.event
        async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowFailed"), follow=False)
        for env in batch
        if isinstance(env.event, FlowFailed)
    ]


# -- screenshots ----------------------------------------------------------------------


@pytest.mark.slow  # two attempts in real Chromium
async def test_failed_flow_stores_its_screenshot_and_the_api_serves_it(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    with failing_site(500) as site:
        url = f"{site.base_url}/"
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            tb.run(Runner(bus, PlaywrightExecutor(VERSION), slots=2).run(), "runner")
            job_id = await tb.create_job(
                [Target(url=url, flows=1)], max_attempts=2, session_seconds=0
            )
            view = await tb.wait_terminal(job_id, timeout=90)
            failures = await flow_failures(bus, job_id)
            async with AsyncTestClient(app=app) as client:
                await log_in(client)
                caught_up = await client.get(
                    f"/api/v1/jobs/{job_id}?min_seq={await bus.last_seq()}"
                )
                assert caught_up.status_code == 200
                flow_id = failures[0].flow_id
                latest = await client.get(f"/api/v1/flows/{flow_id}/screenshot")
                first = await client.get(f"/api/v1/flows/{flow_id}/screenshot?attempt=1")
                beyond = await client.get(f"/api/v1/flows/{flow_id}/screenshot?attempt=3")
                unknown = await client.get("/api/v1/flows/no_such_flow/screenshot")
                malformed = await client.get("/api/v1/flows/a.b/screenshot")
                zero = await client.get(f"/api/v1/flows/{flow_id}/screenshot?attempt=0")
    assert view.status == "failed" and view.flows_failed == 1
    assert [(f.attempt, f.reason) for f in failures] == [(1, "http_500"), (2, "http_500")]
    # the object store, named by flow, attempt and delivery: no local path
    assert [f.screenshot for f in failures] == [
        subjects.screenshot_name(flow_id, 1, 1),
        subjects.screenshot_name(flow_id, 2, 1),
    ]
    store = await bus.js.object_store(subjects.SCREENSHOTS_BUCKET)
    stored = await store.get(subjects.screenshot_name(flow_id, 2, 1))
    assert (latest.status_code, latest.headers["content-type"]) == (200, "image/png")
    assert latest.content.startswith(b"\x89PNG") and latest.content == stored.data
    assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
    assert beyond.status_code == 404 and beyond.json()["field"] == "attempt"
    assert unknown.status_code == 404 and "no_such_flow" in unknown.json()["detail"]
    assert malformed.status_code == 400 and malformed.json()["field"] == "flow_id"
    assert zero.status_code == 400


# -- drains, with two real runner processes ---------------------------------------------

ENV = {"TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": "3"}


async def spawn_sleeping_runner(
    nats_url: str, runner_id: str, record: Path, seconds: float, slots: int, **env: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.runner_proc", "--nats-url", nats_url,
        "--runner-id", runner_id, "--record", str(record), "--seconds", str(seconds),
        "--slots", str(slots),
        env={**os.environ, **ENV, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def started_by(bus: Bus, job_id: str, runner_id: str, count: int) -> list[FlowStarted]:
    """Await the first ``count`` FlowStarted a runner reports for the job."""
    seen: list[FlowStarted] = []
    async with asyncio.timeout(60):
        async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowStarted")):
            for env in batch:
                e = env.event
                if isinstance(e, FlowStarted) and e.runner_id == runner_id:
                    seen.append(e)
            if len(seen) >= count:
                return seen
    raise AssertionError("unreachable")


async def runner_events(bus: Bus, runner_id: str) -> list[str]:
    return [
        type(env.event).__name__
        async for batch in bus.read(1, subjects.runner_subject(runner_id, "*"), follow=False)
        for env in batch
    ]


@pytest.mark.slow
async def test_sigterm_lets_started_flows_finish_and_the_other_runner_takes_the_rest(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows, seconds = 6, 2.5
    record = tmp_path / "runs.jsonl"
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        first = await spawn_sleeping_runner(
            nats_server.url, "runner_a", record, seconds, 2, TB_DRAIN_GRACE="20"
        )
        tb.procs.append(first)
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=2
        )
        await started_by(bus, job_id, "runner_a", 2)  # both of its slots busy
        tb.procs.append(
            await spawn_sleeping_runner(nats_server.url, "runner_b", record, seconds, 2)
        )
        await tb.wait_job(job_id, lambda v: v.status == "running", timeout=10)
        loop = asyncio.get_running_loop()
        first.send_signal(signal.SIGTERM)
        asked = loop.time()
        code = await asyncio.wait_for(first.wait(), 30)
        exited_after = loop.time() - asked
        view = await tb.wait_terminal(job_id, timeout=60)
    runs = read_runs(record)
    assert code == 0
    assert exited_after < seconds + 2.0  # its flows' time, not the 20 s grace
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    on_a = [r for r in runs if r.runner == "runner_a"]
    assert [r.how for r in on_a] == ["done", "done"]  # finished, none cut short
    assert sorted(r.flow_id for r in runs) == sorted({r.flow_id for r in runs})  # once each
    assert len(runs) == flows and all(r.how == "done" for r in runs)
    assert await runner_events(bus, "runner_a") == [
        "RunnerRegistered",
        "RunnerDraining",
        "RunnerDeregistered",
    ]


@pytest.mark.slow
async def test_sigterm_hands_back_what_outlives_the_grace_and_the_other_runner_takes_it_at_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows, seconds, grace = 4, 6.0, 1.0
    record = tmp_path / "runs.jsonl"
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        first = await spawn_sleeping_runner(
            nats_server.url, "runner_a", record, seconds, 2, TB_DRAIN_GRACE=str(grace)
        )
        tb.procs.append(first)
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=2
        )
        handed_back = {e.flow_id for e in await started_by(bus, job_id, "runner_a", 2)}
        tb.procs.append(await spawn_sleeping_runner(nats_server.url, "runner_b", record, 0.5, 2))
        # B is registered and pulling; the queue is empty
        await log_until(bus, subjects.runner_subject("runner_b", "RunnerRegistered"), bool, 30)
        loop = asyncio.get_running_loop()
        first.send_signal(signal.SIGTERM)
        asked = loop.time()
        code = await asyncio.wait_for(first.wait(), 30)
        exited_after = loop.time() - asked
        view = await tb.wait_terminal(job_id, timeout=60)
        done = [
            env.event
            for env in await bus.load(subjects.flow_subject(job_id, "FlowDone"))
            if isinstance(env.event, FlowDone)
        ]
    runs = read_runs(record)
    assert code == 0
    assert grace <= exited_after < grace + 3.0
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    cut = {r.flow_id: r for r in runs if r.runner == "runner_a"}
    assert set(cut) == handed_back and all(r.how == "cancelled" for r in cut.values())
    # each flow done once, by B; the handed-back ones in the same attempt at the next
    # delivery (a drain spends no attempt)
    assert sorted((e.flow_id, e.runner_id, e.attempt, e.delivery) for e in done) == sorted(
        (f"{job_id}_0_{n}", "runner_b", 1, 2 if f"{job_id}_0_{n}" in handed_back else 1)
        for n in range(flows)
    )
    on_b = {r.flow_id: r for r in runs if r.runner == "runner_b"}
    delays = [on_b[f].started - cut[f].ended for f in handed_back]  # type: ignore[operator]
    # at once: no nak delay, no ack wait (3 s) to run out
    assert all(d < 0.5 for d in delays), delays
    assert sorted(on_b) == sorted(f"{job_id}_0_{n}" for n in range(flows))
    assert all(r.how == "done" for r in on_b.values())


async def flow_done_events(bus: Bus, job_id: str) -> list[FlowDone]:
    return [
        env.event
        for env in await bus.load(subjects.flow_subject(job_id, "FlowDone"))
        if isinstance(env.event, FlowDone)
    ]


# -- crashes and restarts ---------------------------------------------------------------


@pytest.mark.slow  # waits out the 3 s ack wait of the killed runner's work items
async def test_sigkilled_runner_items_are_redelivered_same_attempt_next_delivery(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 6
    record = tmp_path / "runs.jsonl"
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        sent = await WorkItemsSent().start(bus)
        first = await spawn_sleeping_runner(nats_server.url, "runner_a", record, 30.0, 2)
        tb.procs.append(first)
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=2
        )
        killed = {e.flow_id for e in await started_by(bus, job_id, "runner_a", 2)}
        first.send_signal(signal.SIGKILL)
        await first.wait()
        tb.procs.append(await spawn_sleeping_runner(nats_server.url, "runner_b", record, 0.2, 2))
        view = await tb.wait_terminal(job_id, timeout=60)
        done = await flow_done_events(bus, job_id)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert sorted((e.flow_id, e.runner_id, e.attempt, e.delivery) for e in done) == sorted(
        (f"{job_id}_0_{n}", "runner_b", 1, 2 if f"{job_id}_0_{n}" in killed else 1)
        for n in range(flows)
    )
    # no attempt spent on the crash: every work item was published once
    assert len(sent.sent) == flows and set(sent.sent.values()) == {1}
    runs = read_runs(record)
    assert sorted(r.flow_id for r in runs if r.runner == "runner_a") == sorted(killed)
    assert sorted(r.flow_id for r in runs if r.runner == "runner_b") == sorted(
        f"{job_id}_0_{n}" for n in range(flows)
    )


@pytest.mark.slow
async def test_runners_ride_out_a_nats_restart_without_losing_or_doubling_flows(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 30
    record = tmp_path / "runs.jsonl"
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        for name in ("runner_a", "runner_b"):
            tb.procs.append(await spawn_sleeping_runner(nats_server.url, name, record, 0.3, 2))
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=4
        )
        await tb.wait_job(job_id, lambda v: v.flows_done >= 8, timeout=60)
        await nats_server.kill()  # SIGKILL, then the same port and store directory
        await nats_server.start()
        view = await tb.wait_terminal(job_id, timeout=90)
        done = await flow_done_events(bus, job_id)
        alive = [p.returncode for p in tb.procs]
    assert alive == [None, None]  # both runners reconnected, neither restarted
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    expected = sorted(f"{job_id}_0_{n}" for n in range(flows))
    assert sorted(e.flow_id for e in done) == expected  # one FlowDone stored per flow
    assert {e.attempt for e in done} == {1}
    runs = Counter(r.flow_id for r in read_runs(record))
    assert sorted(runs) == expected
    # delivery is at-least-once: a flow whose ack did not survive runs again and still
    # counts once. Not only the flows in flight when the server died: a SIGKILLed
    # nats-server also loses acks it had not yet written to its store
    assert all(n <= 2 for n in runs.values()), runs


# -- keepalives -------------------------------------------------------------------------


@pytest.mark.slow  # a 7 s browser session against a 3 s ack wait
async def test_in_progress_acks_keep_a_flow_longer_than_the_ack_wait_to_one_delivery(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    assert bus.config.ack_wait == 3.0
    with recording_site(pages={"/": "<html><body>long read</body></html>"}) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=2)
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=1)], session_seconds=7
            )
            view = await tb.wait_terminal(job_id, timeout=90)
            done = await flow_done_events(bus, job_id)
            info = await bus.js.consumer_info(
                subjects.EVENTS_STREAM, subjects.dispatch_consumer("linux", "chromium")
            )
    assert view.status == "completed" and view.flows_done == 1
    assert [(e.attempt, e.delivery) for e in done] == [(1, 1)]
    assert done[0].duration_ms > 2 * 3000  # it outlived the ack wait twice over
    assert info.num_redelivered == 0 and runner.completed == 1


# -- drains: work not started yet ---------------------------------------------------------


async def test_stop_hands_back_work_not_started_yet_at_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        held = asyncio.Event()  # never set: the draining runner's items wait for admission
        draining = Runner(bus, RecordingExecutor(), slots=2)
        draining.control.admit_now = lambda item: None  # type: ignore[method-assign]

        async def admit(item: FlowDispatched) -> Admission:
            await held.wait()
            raise AssertionError("unreachable")

        draining.control.admit = admit  # type: ignore[method-assign]
        running = asyncio.create_task(draining.run())
        items = [work_item(job_id, n) for n in range(2)]
        for item in items:
            await dispatch(bus, item)
        await asyncio.wait_for(draining.wait_until(lambda: len(draining.runs) == 2), 15)
        registered = asyncio.Event()
        other = Runner(bus, RecordingExecutor(), slots=2, announce=lambda _: registered.set())
        tb.run(other.run(), "other")
        await asyncio.wait_for(registered.wait(), 15)  # pulling, with nothing to take

        loop = asyncio.get_running_loop()
        draining.stop()
        asked = loop.time()
        await asyncio.wait_for(other.wait_until(lambda: other.completed == 2), 15)
        taken_after = loop.time() - asked
        await asyncio.wait_for(running, 10)
        done = await flow_done_events(bus, job_id)
    assert draining.tally[Outcome.RELEASED] == 2 and draining.completed == 0
    # at once: no nak delay, no ack wait (3 s), no drain grace (30 s)
    assert taken_after < 0.9, taken_after
    assert sorted((e.flow_id, e.attempt, e.delivery) for e in done) == sorted(
        (item.flow_id, 1, 2) for item in items
    )


async def test_a_second_stop_hands_back_started_flows_without_waiting_for_the_grace(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        gated = GatedExecutor()  # its flows run until cancelled
        runner = Runner(bus, gated, slots=1, drain_grace=60)
        running = asyncio.create_task(runner.run())
        await dispatch(bus, work_item(job_id, 0))
        await gated.next_start()
        runner.stop()
        await asyncio.sleep(0)  # the first stop drains: the flow runs on
        assert not running.done() and len(runner.runs) == 1
        loop = asyncio.get_running_loop()
        runner.stop()
        asked = loop.time()
        await asyncio.wait_for(running, 10)
        stopped_after = loop.time() - asked
    assert runner.tally[Outcome.RELEASED] == 1 and runner.completed == 0
    assert stopped_after < 2.0  # not the 60 s grace


async def browsing(bus: Bus, job_id: str, flows: int) -> None:
    """Return once ``flows`` of the job's flows have visited a page."""
    seen: set[str] = set()
    async with asyncio.timeout(60):
        async for batch in bus.read(1, subjects.flow_subject(job_id, "PageVisited")):
            seen |= {env.event.flow_id for env in batch if isinstance(env.event, PageVisited)}
            if len(seen) >= flows:
                return


@pytest.mark.slow  # a runner process with real Chromium and 5 s sessions
async def test_ctrl_c_to_the_process_group_drains_a_browser_runner_its_flows_finish(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    pages = {"/": "<html><body>reading<a href='/'>home</a></body></html>"}
    with recording_site(pages=pages) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            # its own process group, as a terminal's foreground job is
            runner = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "runner", "--nats-url", nats_server.url,
                "--slots", "2",
                env={**os.environ, **ENV},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            tb.procs.append(runner)
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=2)], instance_count=2, session_seconds=5
            )
            await browsing(bus, job_id, flows=2)
            os.killpg(runner.pid, signal.SIGINT)  # what Ctrl-C does: the driver gets it too
            code = await asyncio.wait_for(runner.wait(), 40)
            view = await tb.wait_terminal(job_id, timeout=30)
    assert code == 0
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (2, 0)  # finished, not cut short
