"""The runner agent on a real nats-server: slots, its durable consumer, control, poison."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import structlog
from structlog.testing import capture_logs

from agents.backoff import Backoff
from agents.control import Admission, Aggregates, Control, Verdict, fold_job
from agents.executor import AllowedHosts, FlowReport, FlowResult
from agents.flow_run import Outcome
from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from engine.bus import Bus
from engine.jobs.decider import CancelJob, StartJob
from engine.quarantine import list_quarantined
from schemas import VERSION, subjects
from schemas.events import (
    CONSENT_REVOKED,
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowEvent,
    FlowFailed,
    FlowReleased,
    FlowStarted,
    JobCancelled,
    JobEvent,
    JobResumed,
    encode_event,
)
from schemas.values import JobStatus, Platform, Target
from tests.conftest import NatsServer
from tests.harness import Embedded, SteadyExecutor, embedded
from tests.sites import recording_site

pytestmark = pytest.mark.timeout(90)

SITE = "http://127.0.0.1:9/"


class GatedExecutor:
    """Each run waits until the test opens its gate; records how many run at once."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.runs: Counter[str] = Counter()
        self.hosts: dict[str, AllowedHosts | None] = {}
        self.running = 0
        self.peak = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        self.runs[item.flow_id] += 1
        self.hosts[item.flow_id] = hosts
        run = (item.flow_id, self.runs[item.flow_id])
        gate = self.gates[run] = asyncio.Event()
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.put_nowait(run)
        try:
            await gate.wait()  # no keepalive: the ack wait runs out while we wait
        finally:
            self.running -= 1
        return FlowResult(clicks_done=item.clicks, pages=1)

    async def next_start(self, timeout: float = 15) -> tuple[str, int]:
        return await asyncio.wait_for(self.started.get(), timeout)

    def open(self, flow_id: str, n: int) -> None:
        self.gates[(flow_id, n)].set()


async def started_job(tb: Embedded, flows: int = 10) -> str:
    """A running job whose work items the test publishes itself (no dispatcher)."""
    await tb.authorise("127.0.0.1")
    job_id = await tb.create_job([Target(url=SITE, flows=flows)])
    await tb.jobs.execute(StartJob(job_id, frozenset({"127.0.0.1"})), "test")
    return job_id


def work_item(job_id: str, n: int, attempt: int = 1) -> FlowDispatched:
    return FlowDispatched(
        id=f"dispatch-{job_id}-{n}-{attempt}",
        at=datetime.now(UTC),
        actor="system",
        job_id=job_id,
        flow_id=f"{job_id}_0_{n}",
        attempt=attempt,
        target_index=0,
        url=SITE,
        clicks=0,
        session_seconds=0,
        allowed_hosts=["127.0.0.1"],
        seed=n,
    )


async def dispatch(bus: Bus, item: FlowDispatched) -> None:
    await bus.append(item, msg_id=subjects.dispatch_msg_id(item.flow_id, item.attempt))


async def until(condition: Callable[[], bool], changed: asyncio.Event, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            changed.clear()
            await changed.wait()


# -- item 12: slots and the durable consumer -----------------------------------------


@pytest.mark.slow  # waits out a 3 s ack wait
async def test_redelivery_to_the_same_runner_frees_the_right_slot(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        gated = GatedExecutor()
        runner = Runner(bus, gated, slots=2)
        tb.run(runner.run(), "runner")
        first, second = work_item(job_id, 0), work_item(job_id, 1)
        await dispatch(bus, first)
        assert await gated.next_start() == (first.flow_id, 1)
        # nothing keeps the first delivery alive: after the ack wait (3 s) JetStream
        # hands the same flow to this runner again while the first still runs
        assert await gated.next_start() == (first.flow_id, 2)
        await dispatch(bus, second)  # both slots are taken: it waits
        gated.open(first.flow_id, 1)  # the first delivery ends first
        assert await gated.next_start() == (second.flow_id, 1)
        assert {(k.flow_id, k.attempt, k.delivery) for k in runner.runs} == {
            (first.flow_id, 1, 2),
            (second.flow_id, 1, 1),
        }
        assert gated.peak == 2
        gated.open(first.flow_id, 2)
        gated.open(second.flow_id, 1)
        await asyncio.wait_for(runner.wait_idle(), 10)
        assert runner.intake.held == {}
        assert runner.completed == 3


async def test_deleted_dispatch_consumer_is_recreated_and_the_job_completes(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 20
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        runner = Runner(bus, SteadyExecutor(0.05), slots=2)
        tb.run(runner.run(), "runner")
        job_id = await tb.create_job([Target(url=SITE, flows=flows)], instance_count=2)
        await tb.wait_job(job_id, lambda v: v.flows_done >= 4, timeout=60)
        with capture_logs() as logs:
            await bus.js.delete_consumer(
                subjects.EVENTS_STREAM, subjects.dispatch_consumer("linux", "chromium")
            )
            view = await tb.wait_terminal(job_id, timeout=60)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert runner.intake.recreated == 1
    # no busy loop: one unanswered pull noticed the loss, not thousands
    assert runner.intake.pulls <= 3
    said = Counter(line["event"] for line in logs if line["log_level"] in ("warning", "error"))
    assert said["intake.consumer_recreated"] == 1
    assert sum(said.values()) <= 3, said


# -- item 8: the delivery a runner ran ------------------------------------------------


@pytest.mark.slow  # waits out a 3 s ack wait
async def test_redelivered_work_item_reports_its_delivery_and_keeps_its_attempt(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        item = work_item(job_id, 0)
        await dispatch(bus, item)
        # a runner that takes the item and dies before it reports: never acked
        crashed = await bus.js.pull_subscribe_bind(
            subjects.dispatch_consumer("linux", "chromium"), stream=subjects.EVENTS_STREAM
        )
        (taken,) = await crashed.fetch(1, timeout=10)
        await crashed.unsubscribe()
        runner = Runner(bus, SteadyExecutor(0), slots=1)
        tb.run(runner.run(), "runner")
        await asyncio.wait_for(runner.wait_until(lambda: runner.completed == 1), 15)
    assert taken.metadata.num_delivered == 1
    events = await flow_events(bus, job_id)
    assert [(type(e).__name__, e.attempt, e.delivery) for e in events] == [
        ("FlowStarted", 1, 2),
        ("FlowDone", 1, 2),
    ]


async def flow_events(bus: Bus, job_id: str) -> list[FlowEvent]:
    return [
        env.event
        async for batch in bus.read(1, subjects.flow_subject(job_id, "*"), follow=False)
        for env in batch
        if isinstance(env.event, FlowEvent)
    ]


# -- item 2: poison work items --------------------------------------------------------


async def test_garbage_on_the_work_queue_is_quarantined_and_the_job_completes(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 12
    queue = subjects.dispatch_subject("linux", "chromium")
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        runner = Runner(bus, SteadyExecutor(0.05), slots=2)
        running = asyncio.create_task(runner.run())
        job_id = await tb.create_job([Target(url=SITE, flows=flows)], instance_count=2)
        await tb.wait_job(job_id, lambda v: v.flows_done >= 3, timeout=60)
        done_item = FlowDone(
            id="x", at=datetime.now(UTC), actor="x", job_id=job_id, flow_id="f", attempt=1,
            runner_id="r", target_index=0,
        )  # fmt: skip
        windows_item = msgspec.structs.replace(
            work_item(job_id, 99), platform=Platform(os="windows")
        )
        garbage = [
            b"{not json",
            b'{"no": "type"}',
            b'{"type": "FlowTeleported", "id": "x"}',
            encode_event(done_item),  # an event, but not a work item
            encode_event(windows_item),  # a work item for another platform's queue
        ]
        for data in garbage:
            await bus.js.publish(queue, data)
        view = await tb.wait_terminal(job_id, timeout=60)
        alive = not running.done()
        runner.stop()
        await asyncio.wait_for(running, 30)
        records, _ = await list_quarantined(bus.js)
    assert alive
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert runner.intake.poisoned == len(garbage)
    assert sorted(r.raw for r in records) == sorted(garbage)
    assert {r.subject for r in records} == {queue}
    assert runner.completed == flows


# -- item 7: job state from the stream ------------------------------------------------


class Relay:
    """A TCP relay on loopback between a client and nats-server that the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Close every relayed connection and refuse new ones until ``start``."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class RecordingExecutor(SteadyExecutor):
    def __init__(self, seconds: float = 0) -> None:
        super().__init__(seconds)
        self.ran: list[str] = []

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        self.ran.append(item.flow_id)
        return await super().run(item, report, hosts)


async def test_runner_started_after_a_cancel_runs_none_of_the_cancelled_items(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        job_id = await tb.create_job([Target(url=SITE, flows=8)], instance_count=4)
        queued = 0
        async with asyncio.timeout(30):  # the dispatcher queues four work items
            async for batch in bus.read(1, subjects.ALL_DISPATCH):
                queued += sum(
                    isinstance(e.event, FlowDispatched) and e.event.job_id == job_id for e in batch
                )
                if queued == 4:
                    break
        await tb.jobs.execute(CancelJob(job_id), "test")
        await tb.wait_job(job_id, lambda v: v.status == "cancelled", timeout=10)
        executor = RecordingExecutor()
        runner = Runner(bus, executor, slots=4)
        tb.run(runner.run(), "runner")
        await asyncio.wait_for(runner.wait_until(lambda: runner.tally[Outcome.DROPPED] == 4), 15)
    assert executor.ran == []
    assert await flow_events(bus, job_id) == []  # nothing reported: the dispatcher let them go


@pytest.mark.slow
async def test_runner_cut_off_during_a_cancel_does_not_run_the_cancelled_items(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    relay = Relay(nats_server.port)
    await relay.start()
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        cut_off = await Bus.connect(relay.url, name="runner", config=bus.config)
        executor = RecordingExecutor()
        runner = Runner(cut_off, executor, slots=4)
        tb.run(runner.run(), "runner")
        await dispatch(bus, work_item(job_id, 0))
        await asyncio.wait_for(runner.wait_until(lambda: runner.completed == 1), 15)
        assert runner.control.jobs.peek(job_id) == "running"  # known, and cached

        with capture_logs() as logs:
            await relay.cut()
            for n in (1, 2, 3):  # queued before the cancel, delivered after it
                await dispatch(bus, work_item(job_id, n))
            await tb.jobs.execute(CancelJob(job_id), "test")
            await relay.start()
            await asyncio.wait_for(
                runner.wait_until(lambda: runner.tally[Outcome.DROPPED] == 3), 30
            )
        await cut_off.close()
    assert executor.ran == [work_item(job_id, 0).flow_id]
    said = Counter(line["event"] for line in logs if line["log_level"] in ("warning", "error"))
    assert said.get("intake.pull.retrying", 0) <= 1, said


async def test_job_state_cache_is_bounded_and_folds_by_stream_sequence() -> None:
    loads: list[str] = []

    def stored(job_id: str, seq: int, kind: type[JobEvent]) -> Envelope:
        event = kind(id=f"e{seq}", at=datetime.now(UTC), actor="t", job_id=job_id)
        return Envelope(seq, subjects.subject_for(event), event)

    async def load(job_id: str) -> list[Envelope]:
        loads.append(job_id)
        return [stored(job_id, 5, JobCancelled)]

    jobs: Aggregates[JobStatus] = Aggregates(2, lambda _: JobStatus.NEW, fold_job, load)
    for job_id in ("a", "b", "c"):
        assert await jobs.get(job_id) == JobStatus.CANCELLED
    assert len(jobs) == 2 and jobs.peek("a") is None  # the least recently used left
    jobs.apply("b", 4, stored("b", 4, JobResumed).event)  # older than what it holds
    assert jobs.peek("b") == JobStatus.CANCELLED
    await jobs.get("a")
    assert loads == ["a", "b", "c", "a"]


async def test_after_a_reconnect_work_waits_until_control_has_caught_up(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    relay = Relay(nats_server.port)
    await relay.start()
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(relay.url, reconnected_cb=on_reconnect, reconnect_time_wait=0.1)
    control = Control(Bus(nc, bus.config))
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        await control.start()
        item = work_item(job_id, 1)
        assert (await asyncio.wait_for(control.admit(item), 10)).verdict is Verdict.RUN
        assert control.admit_now(item) == Admission(Verdict.RUN, hosts=frozenset({"127.0.0.1"}))

        await relay.cut()
        await tb.jobs.execute(CancelJob(job_id), "test")  # while the runner is cut off
        await relay.start()
        await asyncio.wait_for(reconnected.wait(), 10)
        # the cache still says "running", but nothing starts on it before the follower
        # has caught up with what happened meanwhile
        assert control.admit_now(item) is None
        admission = await asyncio.wait_for(control.admit(item), 10)
        await control.stop()
    await nc.close()
    assert admission.verdict is Verdict.DROP


async def test_paused_job_releases_its_queued_items_and_runs_them_after_resume(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 8
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        gated = GatedExecutor()
        runner = Runner(bus, gated, slots=2)
        tb.run(runner.run(), "runner")
        # four in flight for the dispatcher, two of them running: two wait in the queue
        job_id = await tb.create_job([Target(url=SITE, flows=flows)], instance_count=4)
        running = {await gated.next_start(), await gated.next_start()}
        await tb.jobs.pause(job_id, "test", reason="test")
        await tb.wait_job(job_id, lambda v: v.status == "paused", timeout=10)
        for flow_id, n in running:  # in flight when paused: they finish
            gated.open(flow_id, n)
        await asyncio.wait_for(runner.wait_until(lambda: runner.tally[Outcome.RELEASED] == 2), 15)
        assert runner.completed == 2 and gated.started.empty()

        await tb.jobs.resume(job_id, "test")
        for _ in range(flows - 2):
            gated.open(*await gated.next_start())
        view = await tb.wait_terminal(job_id, timeout=60)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    events = await flow_events(bus, job_id)
    released = {(e.flow_id, e.attempt) for e in events if isinstance(e, FlowReleased)}
    started = {(e.flow_id, e.attempt) for e in events if isinstance(e, FlowStarted)}
    assert len(released) == 2 and not released & started  # released unrun ...
    assert {f for f, _ in released} <= {e.flow_id for e in events if isinstance(e, FlowDone)}
    assert all(e.reason == "job paused" for e in events if isinstance(e, FlowReleased))


# -- item 3: transient NATS trouble ---------------------------------------------------

OUTAGE = 12.0  # seconds cut off from NATS: longer than a publish may wait for its ack


@pytest.mark.slow
async def test_runner_rides_out_a_nats_outage_and_says_so_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 30
    relay = Relay(nats_server.port)
    await relay.start()
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        cut_off = await Bus.connect(relay.url, name="runner", config=bus.config)
        runner = Runner(cut_off, SteadyExecutor(0.1), slots=2)
        running = asyncio.create_task(runner.run())
        job_id = await tb.create_job([Target(url=SITE, flows=flows)], instance_count=2)
        await tb.wait_job(job_id, lambda v: v.flows_done >= 4, timeout=60)
        with capture_logs() as logs:
            await relay.cut()
            await asyncio.sleep(OUTAGE)
            await relay.start()
            view = await tb.wait_terminal(job_id, timeout=60)
        alive = not running.done()
        runner.stop()
        await asyncio.wait_for(running, 30)
        await cut_off.close()
    assert alive
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    said = Counter(line["event"] for line in logs)
    episodes = {e: n for e, n in said.items() if e.endswith((".retrying", ".recovered"))}
    assert "runner.heartbeat.retrying" in episodes  # the outage was noticed ...
    assert all(n == 1 for n in episodes.values()), episodes  # ... and told once


def test_backoff_is_capped_jittered_and_told_once_per_episode() -> None:
    backoff = Backoff("thing", base=0.1, cap=1.0, rng=random.Random(7))
    with capture_logs() as logs:
        delays = [backoff.failed(TimeoutError()) for _ in range(12)]
        backoff.succeeded()
        backoff.succeeded()  # no episode open: nothing to say
        second = backoff.failed("again")
    assert [line["event"] for line in logs] == [
        "thing.retrying",
        "thing.recovered",
        "thing.retrying",
    ]
    assert all(0.05 <= d <= 1.0 for d in delays) and max(delays) > 0.5  # grows, capped
    assert len(set(delays)) == len(delays)  # jittered
    assert 0.05 <= second <= 0.1  # a new episode starts small again
    assert backoff.episodes == 2


# -- item 6: revocation, in real Chromium ----------------------------------------------

TICKING = {
    # the page keeps asking its own host for more while the flow dwells
    "/": "<html><body><script>setInterval(() => fetch('/tick?' + Date.now()), 100)"
    "</script><a href='/'>home</a></body></html>",
    "/tick": "ok",
}


@pytest.mark.slow
async def test_revocation_ends_the_flows_on_the_host_and_its_browser_goes_quiet(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    with recording_site(pages=TICKING) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=1)
            tb.run(runner.run(), "runner")
            # one flow in its 30 s session, two more queued for the same host
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=3)], instance_count=3, session_seconds=30
            )
            async with asyncio.timeout(60):
                async for batch in bus.read(1, subjects.flow_subject(job_id, "PageVisited")):
                    if batch:
                        break
            await tb.consents.revoke("127.0.0.1", reason="owner withdrew", actor="test")
            revoked_at = time.monotonic()
            failures = await terminal_failures(bus, job_id, flows=3, timeout=30)
            quiet_since = revoked_at + 2.0
            job_requests = [
                at
                for at, (_, headers) in zip(site.arrived, site.requests, strict=False)
                if headers.get("x-trafficbuster") == job_id
            ]
    assert job_requests and min(job_requests) < revoked_at  # it was browsing before
    assert [at - revoked_at for at in job_requests if at > quiet_since] == []
    assert len(failures) == 3  # one terminal event per flow, whoever wrote it
    assert all(f.reason == CONSENT_REVOKED and not f.retryable for f in failures)
    assert runner.completed == 0
    started = {e.flow_id for e in await flow_events(bus, job_id) if isinstance(e, FlowStarted)}
    assert len(started) == 1  # the queued two never got a browser


async def test_a_flow_that_merely_allows_a_revoked_host_goes_on_without_it(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        await tb.authorise("127.0.0.2")
        job_id = await tb.create_job(
            [Target(url=SITE, flows=1), Target(url="http://127.0.0.2:9/", flows=1)]
        )
        both = frozenset({"127.0.0.1", "127.0.0.2"})
        await tb.jobs.execute(StartJob(job_id, both), "test")
        gated = GatedExecutor()
        runner = Runner(bus, gated, slots=1)
        tb.run(runner.run(), "runner")
        item = msgspec.structs.replace(work_item(job_id, 0), allowed_hosts=sorted(both))
        await dispatch(bus, item)
        await gated.next_start()
        hosts = gated.hosts[item.flow_id]
        assert hosts is not None and hosts.current == both
        revoked = asyncio.Event()
        hosts.watch(lambda host: revoked.set())

        await tb.consents.revoke("127.0.0.2", reason="owner withdrew", actor="test")
        await asyncio.wait_for(revoked.wait(), 5)
        assert hosts.current == {"127.0.0.1"} and item.flow_id in {k.flow_id for k in runner.runs}
        gated.open(item.flow_id, 1)
        await asyncio.wait_for(runner.wait_until(lambda: runner.completed == 1), 10)


async def terminal_failures(bus: Bus, job_id: str, flows: int, timeout: float) -> list[FlowFailed]:
    """The FlowFailed of each flow, once every flow has one (stored once per msg-id)."""
    found: dict[str, FlowFailed] = {}
    async with asyncio.timeout(timeout):
        async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowFailed")):
            for env in batch:
                assert isinstance(env.event, FlowFailed)
                assert env.event.flow_id not in found, "two outcomes for one flow"
                found[env.event.flow_id] = env.event
            if len(found) == flows:
                return list(found.values())
    raise AssertionError("unreachable")


@contextlib.contextmanager
def told(said: Callable[[dict[str, Any]], bool]) -> Iterator[asyncio.Event]:
    """An event set once a log line satisfies ``said`` (lines are captured, not printed)."""
    seen = asyncio.Event()

    def spy(_: object, __: str, line: dict[str, Any]) -> dict[str, Any]:
        if said(line):
            seen.set()
        raise structlog.DropEvent

    with capture_logs():  # restores the configuration afterwards
        structlog.configure(processors=[spy])
        yield seen


async def test_runner_stopped_while_waiting_for_the_streams_stops_at_once(
    nats_server: NatsServer,
) -> None:
    bare = await Bus.connect(nats_server.url, name="runner")  # nothing provisioned yet
    runner = Runner(bare, SteadyExecutor(0), slots=1)
    with told(lambda line: line["event"].startswith("Waiting for the engine")) as waiting:
        running = asyncio.create_task(runner.run())
        await asyncio.wait_for(waiting.wait(), 10)
    runner.stop()
    await asyncio.wait_for(running, 5)
    await bare.close()
