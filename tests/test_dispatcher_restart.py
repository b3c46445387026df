"""The dispatcher checkpoints its state: a restart reads the log from the snapshot on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.runner import Runner
from engine.bus import Batch, Bus
from engine.dispatch import snapshot
from engine.dispatch.snapshot import SNAPSHOT_OBJECT, SnapshotStore
from engine.dispatch.state import DispatchState, Finish
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import Envelope, JobCancelled, JobCompleted, JobStarted, TbEvent
from schemas.values import ConsentCaps, Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, WorkItemsSent, embedded
from tests.test_dispatch_state import NOW, World, dispatched, done, failed

# -- the state: only live jobs, and idempotence ----------------------------------------------


def fingerprint(state: DispatchState) -> bytes:
    """Everything the state holds except how far the reader got."""
    return snapshot.encode(replace(state, position=0))


def completed(job_id: str, flows_done: int) -> JobCompleted:
    return JobCompleted(
        id="c", at=NOW, actor="t", job_id=job_id, flows_done=flows_done, flows_failed=0
    )


def test_completed_job_leaves_the_state_and_its_late_events_change_nothing() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=3, instance_count=3)
    ds = w.dispatch_all()
    for d in ds:
        w.add(done(d))
    assert w.state.plan(NOW) == [Finish("j1")]
    w.add(completed("j1", 3))
    assert "j1" not in w.state.jobs
    before = fingerprint(w.state)
    late_events: list[TbEvent] = [
        done(ds[0]),
        failed(ds[1]),
        dispatched(replace(ds[2], attempt=2)),
        JobCancelled(id="x", at=NOW, actor="t", job_id="j1", reason="late"),
        JobStarted(id="s", at=NOW, actor="t", job_id="j1", flows_total=3, allowed_hosts=[]),
    ]
    for late in late_events:
        w.add(late)  # a redelivery after the dedupe window: a new sequence
    assert fingerprint(w.state) == before
    assert w.state.plan(NOW) == []


def test_state_and_snapshot_hold_only_live_jobs_however_many_finished() -> None:
    def history(finished: int) -> DispatchState:
        w = World()
        w.consent("a.test", ConsentCaps(max_concurrent=1000))
        for n in range(finished):
            w.job(f"old{n}", flows=2, instance_count=2)
            for d in w.dispatch_all(at=NOW - timedelta(hours=1)):
                w.add(done(d))
            w.add(completed(f"old{n}", 2))
        w.job("live", flows=20, instance_count=5)
        w.dispatch_all()
        return w.state

    few, many = history(1), history(200)
    assert list(many.jobs) == list(few.jobs) == ["live"]
    # the same live job, consents and capacity whatever the history; only its sequence
    # numbers (created_seq, version, its 5 work items') are wider integers
    assert len(fingerprint(few)) <= len(fingerprint(many)) <= len(fingerprint(few)) + 8 + 2 * 5
    restored = snapshot.decode(snapshot.encode(many))
    assert restored is not None and list(restored.jobs) == ["live"]


def test_cancelled_job_gives_its_in_flight_capacity_back() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=2))
    w.job("j1", flows=5, instance_count=5)
    first = w.dispatch_all()
    assert len(first) == 2
    w.add(JobCancelled(id="x", at=NOW, actor="t", job_id="j1", reason="stop"))
    assert "j1" not in w.state.jobs
    assert w.state.domain_in_flight["a.test"] == 0
    w.job("j2", flows=5, instance_count=5)
    assert len(w.dispatch_all()) == 2
    w.add(done(first[0]))  # the runner dropped it; had it not, its report is a no-op
    assert w.state.domain_in_flight["a.test"] == 2


class TwiceWorld(World):
    """Applies every event a second time, as when the dispatcher ran ahead of the reader."""

    def add(self, event: TbEvent) -> None:
        super().add(event)
        before = fingerprint(self.state)
        self.state.apply(Envelope(seq=self.seq, subject="", event=event))
        assert fingerprint(self.state) == before, type(event).__name__


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.sampled_from(["done", "fail", "fatal", "cancel"]), st.integers(0, 30)),
        max_size=40,
    ),
    st.integers(1, 4),
)
def test_applying_an_event_again_changes_nothing(steps: list[tuple[str, int]], cap: int) -> None:
    w = TwiceWorld()
    w.consent("a.test", ConsentCaps(max_concurrent=3))
    w.job("j1", flows=6, instance_count=cap)
    live = w.dispatch_all()
    for kind, pick in steps:
        if not live:
            break
        d = live[pick % len(live)]
        if kind == "cancel":
            w.add(JobCancelled(id="x", at=NOW, actor="t", job_id="j1", reason=""))
            break
        w.add(done(d) if kind == "done" else failed(d, retryable=kind == "fail"))
        live.remove(d)
        live += w.dispatch_all()
    for action in w.state.plan(NOW):
        if isinstance(action, Finish):
            w.add(completed("j1", w.state.jobs["j1"].done))
    assert "j1" not in w.state.jobs or live


# -- the snapshot format ----------------------------------------------------------------


def test_snapshot_round_trip_plans_the_same() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=50, max_flows_per_minute=4))
    w.job("j1", flows=10, instance_count=5)
    w.job("j2", flows=2, instance_count=2)
    ds = w.dispatch_all()
    w.add(failed(ds[0]))  # back to the front of the queue, attempt 1 spent
    w.add(done(ds[1]))
    restored = snapshot.decode(snapshot.encode(w.state))
    assert restored is not None
    assert restored.position == w.state.position
    assert snapshot.encode(restored) == snapshot.encode(w.state)
    assert restored.plan(NOW) == w.state.plan(NOW)


def test_unknown_format_or_garbage_is_no_snapshot() -> None:
    w = World()
    w.job("j1", flows=2, instance_count=1)
    good = msgspec.msgpack.decode(snapshot.encode(w.state))
    assert snapshot.decode(msgspec.msgpack.encode({**good, "format": 999})) is None
    assert snapshot.decode(msgspec.msgpack.encode({"format": snapshot.SNAPSHOT_FORMAT})) is None
    assert snapshot.decode(b"\x00not msgpack at all") is None
    assert snapshot.decode(b"") is None
    broken = {**good, "jobs": [[*good["jobs"][0][:3], [7], *good["jobs"][0][4:]]]}
    assert snapshot.decode(msgspec.msgpack.encode(broken)) is None  # queue index out of range


# -- a real dispatcher on a real nats-server ----------------------------------------------


class SpyBus(Bus):
    """Records where every read of the log starts and the first sequence it delivered."""

    starts: list[int]
    first_delivered: list[int]

    def read_batches(self, start_seq: int, *args: Any, **kwargs: Any) -> Any:
        self.starts.append(start_seq)
        return self._spy(super().read_batches(start_seq, *args, **kwargs))

    async def _spy(self, batches: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
        first = True
        async for batch in batches:
            if first and batch.envelopes:
                self.first_delivered.append(batch.envelopes[0].seq)
                first = False
            yield batch


@contextlib.asynccontextmanager
async def spy_bus(url: str) -> AsyncIterator[SpyBus]:
    bus = await SpyBus.connect(url, name="spy")
    bus.starts, bus.first_delivered = [], []
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    task = asyncio.create_task(dispatcher.run(), name="dispatcher")
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_restarted_dispatcher_resumes_from_its_snapshot_and_the_job_completes(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 30
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        sent = await WorkItemsSent().start(bus)
        tb.run(Runner(bus, SteadyExecutor(0.05), slots=4).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows, clicks=1)], instance_count=4
        )
        first = Dispatcher(bus, snapshot_every_events=1, snapshot_interval=0.1)
        async with running(first):
            await tb.wait_job(job_id, lambda v: v.flows_done >= 8, timeout=60)
            await asyncio.wait_for(first.wait_saved(first.state.position), 10)
        saved = first.saved_position
        assert saved > 1
        async with spy_bus(nats_server.url) as spy:
            second = Dispatcher(spy, snapshot_every_events=1, snapshot_interval=0.1)
            async with running(second):
                view = await tb.wait_terminal(job_id, timeout=60)
                # a snapshot stored while the first was stopping is at least as new
                assert second.resumed_from >= saved + 1
                assert spy.starts == [second.resumed_from]
                assert all(seq >= second.resumed_from for seq in spy.first_delivered)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert view.targets[0].click_done == flows
    # no flow needed a second attempt, and neither dispatcher published a work item twice
    attempts = sent.of_job(job_id)
    assert len(attempts) == flows and set(attempts.values()) == {1}
    assert len(sent.sent) == flows and set(sent.sent.values()) == {1}


async def test_corrupt_snapshot_falls_back_to_a_full_read(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 6
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        store = await bus.js.object_store(subjects.DISPATCHER_BUCKET)
        await store.put(SNAPSHOT_OBJECT, b"\x93\xa3not a snapshot")
        assert await SnapshotStore(bus).load() is not None
        tb.run(Runner(bus, SteadyExecutor(0.01), slots=2).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=2
        )
        dispatcher = Dispatcher(bus, snapshot_every_events=1, snapshot_interval=0.1)
        async with running(dispatcher):
            view = await tb.wait_terminal(job_id, timeout=60)
            assert dispatcher.resumed_from == 1
            # and the corrupt one is replaced by a good one
            await asyncio.wait_for(dispatcher.wait_saved(dispatcher.state.position), 10)
        stored = await SnapshotStore(bus).load()
        assert stored is not None and snapshot.decode(stored) is not None
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)


async def test_catching_up_on_the_whole_stream_folds_the_same_state_as_the_filtered_read(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        runner = Runner(bus, SteadyExecutor(0.01), slots=4)
        tb.run(runner.run(), "runner")  # FlowStarted, PageVisited, runners: not inputs
        first = Dispatcher(bus)
        async with running(first):
            done_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=5)])
            await tb.wait_terminal(done_id)
            live_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=50)])
            await tb.wait_job(live_id, lambda v: v.flows_done >= 5)
    states = []
    for threshold in (0, 10**9):  # always the whole stream first, or never
        store = await bus.js.object_store(subjects.DISPATCHER_BUCKET)
        with contextlib.suppress(nats.js.errors.ObjectNotFoundError):
            await store.delete(SNAPSHOT_OBJECT)
        dispatcher = Dispatcher(bus, tick_interval=3600)
        dispatcher.reader.unfiltered_catch_up = threshold
        dispatcher.tick = _no_tick  # type: ignore[method-assign]  # read only, decide nothing
        async with running(dispatcher):
            await dispatcher.wait_ready()
            states.append(dispatcher.state)
    assert list(states[0].jobs) == [live_id]
    assert fingerprint(states[0]) == fingerprint(states[1])


async def _no_tick() -> None:
    pass
