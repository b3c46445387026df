"""Dispatcher cost with a long history: 100,000 finished jobs against 100, in one run.

The same live jobs (running, every instance busy, flows queued) sit in both histories;
only the number of finished jobs before them differs. For each history a dispatcher
reads the log from sequence 1; then the benchmark times ``tick()`` on both states in
turns (planning over the state, nothing to publish) and measures the encoded
snapshots. Finished jobs leave the dispatcher's state, so both figures should not
depend on how many there were.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from cli.nats_server import start_nats_server_on_any_port
from engine.bus import Appended, Bus, Expect
from engine.dispatch import snapshot
from engine.dispatch.state import DispatchState, flow_id
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    Event,
    FlowDispatched,
    FlowDone,
    JobCompleted,
    JobCreated,
    JobStarted,
)
from schemas.values import ConsentCaps, JobSettings, Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)
HOST = "site.test"
URL = f"http://{HOST}/"


def job_history(
    job: str, flows: int, dispatched: int, done: int, instance_count: int = 1, at: datetime = NOW
) -> Iterator[tuple[Event, str]]:
    common = {"id": "e", "at": at, "actor": "bench", "job_id": job}
    settings = JobSettings(instance_count=instance_count)
    yield (
        JobCreated(**common, name=job, targets=[Target(url=URL, flows=flows)], settings=settings),
        f"{job}:c",
    )
    yield JobStarted(**common, flows_total=flows, allowed_hosts=[HOST]), f"{job}:s"
    for n in range(dispatched):
        fid = flow_id(job, 0, n)
        item = FlowDispatched(
            **common, flow_id=fid, attempt=1, target_index=0, url=URL, clicks=0,
            session_seconds=1, allowed_hosts=[HOST], seed=n,
        )  # fmt: skip
        yield item, subjects.dispatch_msg_id(fid, 1)
    for n in range(done):
        fid = flow_id(job, 0, n)
        event = FlowDone(**common, flow_id=fid, attempt=1, runner_id="r", target_index=0)
        yield event, subjects.flow_msg_id(event)
    if done == flows:
        yield JobCompleted(**common, flows_done=done, flows_failed=0), f"{job}:done"


def finished(first: int, count: int) -> Iterator[tuple[Event, str]]:
    """Jobs of one flow each that ran and completed in the days before ``NOW``."""
    for j in range(first, first + count):
        yield from job_history(f"done{j:07d}", 1, 1, 1, at=NOW - timedelta(days=2, seconds=-j))


def live(jobs: int, flows: int, instance_count: int) -> Iterator[tuple[Event, str]]:
    consent = ConsentGiven(
        id="g", at=NOW, actor="bench", domain=HOST, evidence="bench",
        expires_at=NOW + timedelta(days=30),
        caps=ConsentCaps(max_concurrent=10_000, max_flows_per_minute=1_000_000),
    )  # fmt: skip
    yield consent, "consent"
    for j in range(jobs):
        yield from job_history(f"live{j:04d}", flows, instance_count, 0, instance_count)


async def append_all(bus: Bus, events: Iterator[tuple[Event, str]]) -> None:
    """Pipelined, every ack awaited; a job's first event is stored expecting none before
    it, as the job service stores it (readers refuse a JobCreated stored otherwise)."""
    acks: list[asyncio.Future[Appended]] = []
    for event, msg_id in events:
        expect = None
        if isinstance(event, JobCreated):
            expect = Expect(subjects.job_stream_filter(event.job_id), 0)
        acks.append(await bus.append_nowait(event, msg_id=msg_id, expect=expect))
        if len(acks) == 5000:
            await asyncio.gather(*acks)
            acks.clear()
    await asyncio.gather(*acks)


async def caught_up_state(bus: Bus) -> tuple[DispatchState, float]:
    """The state a dispatcher reads from sequence 1, and how long that took."""
    store = await bus.js.object_store(subjects.DISPATCHER_BUCKET)
    with contextlib.suppress(Exception):
        await store.delete("state")
    dispatcher = Dispatcher(bus, clock=lambda: NOW, snapshot_every_events=10**12)
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run())
    try:
        await dispatcher.wait_ready()
        ready = time.perf_counter() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return dispatcher.state, ready


async def tick_times(bus: Bus, states: list[DispatchState], ticks: int) -> list[float]:
    """Median ``tick()`` seconds per state, timed in turns so machine noise hits all alike."""
    dispatcher = Dispatcher(bus, clock=lambda: NOW)
    times: list[list[float]] = [[] for _ in states]
    for state in states:
        dispatcher.reader.state = state
        await dispatcher.tick()  # warm-up, and anything still due
    for _ in range(ticks):
        for n, state in enumerate(states):
            dispatcher.reader.state = state
            started = time.perf_counter()
            await dispatcher.tick()
            times[n].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


async def main(finished_jobs: int, baseline_jobs: int, ticks: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        nats, port = await start_nats_server_on_any_port(Path(tmp) / "js")
        try:
            bus = await Bus.connect(f"nats://127.0.0.1:{port}", name="bench")
            await bus.provision()
            await append_all(bus, live(jobs=20, flows=200, instance_count=10))
            await append_all(bus, finished(0, baseline_jobs))
            print(f"history with {baseline_jobs:,} finished jobs: {await bus.last_seq():,} events")
            small, small_ready = await caught_up_state(bus)
            built = time.perf_counter()
            await append_all(bus, finished(baseline_jobs, finished_jobs - baseline_jobs))
            print(
                f"history with {finished_jobs:,} finished jobs: {await bus.last_seq():,} events"
                f" (built in {time.perf_counter() - built:.1f}s)"
            )
            large, large_ready = await caught_up_state(bus)
            small_tick, large_tick = await tick_times(bus, [small, large], ticks)
            small_size, large_size = len(snapshot.encode(small)), len(snapshot.encode(large))
            for label, tick, size, ready, state in (
                (f"{baseline_jobs:,} finished", small_tick, small_size, small_ready, small),
                (f"{finished_jobs:,} finished", large_tick, large_size, large_ready, large),
            ):
                print(
                    f"{label:>18}: {len(state.jobs)} jobs held, tick {tick * 1e6:,.0f} µs"
                    f" (median of {ticks}), snapshot {size:,} bytes,"
                    f" read from sequence 1 in {ready:.2f}s"
                )
            print(
                f"ratio {finished_jobs:,} : {baseline_jobs:,} finished jobs:"
                f" tick {large_tick / small_tick:.3f}, snapshot {large_size / small_size:.3f}"
                "  (goal: within 10%, i.e. <= 1.10)"
            )
            await bus.close()
        finally:
            nats.kill()
            await nats.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.finished, args.baseline, args.ticks))
