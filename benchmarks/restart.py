"""Dispatcher restart: resuming from its snapshot against reading the log from sequence 1.

Builds a history of completed jobs plus one large running job, then times, in one
run against the same nats-server, how long a dispatcher takes until it is ready to
plan: first with no snapshot (the baseline, a full read), then from the snapshot.
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
from datetime import UTC, datetime
from pathlib import Path

import structlog

from cli.nats_server import start_nats_server_on_any_port
from engine.bus import Bus, Expect
from engine.dispatch.state import flow_id
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import (
    Event,
    FlowDispatched,
    FlowDone,
    JobCompleted,
    JobCreated,
    JobStarted,
)
from schemas.values import JobSettings, Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)
URL = "http://site.test/"
FLOWS_PER_JOB = 100


def job_history(job: str, flows: int, dispatched: int, done: int) -> Iterator[tuple[Event, str]]:
    common = {"id": "e", "at": NOW, "actor": "bench", "job_id": job}
    settings = JobSettings()
    yield (
        JobCreated(**common, name=job, targets=[Target(url=URL, flows=flows)], settings=settings),
        f"{job}:c",
    )
    yield JobStarted(**common, flows_total=flows, allowed_hosts=["site.test"]), f"{job}:s"
    for n in range(dispatched):
        fid = flow_id(job, 0, n)
        item = FlowDispatched(
            **common, flow_id=fid, attempt=1, target_index=0, url=URL, clicks=0,
            session_seconds=1, allowed_hosts=["site.test"], seed=n,
        )  # fmt: skip
        yield item, subjects.dispatch_msg_id(fid, 1)
    for n in range(done):
        fid = flow_id(job, 0, n)
        event = FlowDone(**common, flow_id=fid, attempt=1, runner_id="r", target_index=0)
        yield event, subjects.flow_msg_id(event)
    if done == flows:
        yield JobCompleted(**common, flows_done=done, flows_failed=0), f"{job}:done"


def history(events: int) -> Iterator[tuple[Event, str]]:
    running = 20_000
    jobs = max(1, (events - running) // (2 * FLOWS_PER_JOB + 3))
    for j in range(jobs):
        yield from job_history(f"job{j:07d}", FLOWS_PER_JOB, FLOWS_PER_JOB, FLOWS_PER_JOB)
    yield from job_history("jobrunning", running, running // 2, running // 4)


async def time_to_ready(bus: Bus) -> tuple[float, Dispatcher]:
    # the history's clock: its in-flight flows are not stuck, they are running
    dispatcher = Dispatcher(bus, clock=lambda: NOW, snapshot_every_events=1)
    started = time.perf_counter()
    task = asyncio.create_task(dispatcher.run())
    await dispatcher.wait_ready()
    elapsed = time.perf_counter() - started
    await dispatcher.wait_saved(dispatcher.state.position)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return elapsed, dispatcher


async def main(events: int, rounds: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        nats, port = await start_nats_server_on_any_port(Path(tmp) / "js")
        try:
            bus = await Bus.connect(f"nats://127.0.0.1:{port}", name="bench")
            await bus.provision()
            built = time.perf_counter()
            batch: list[tuple[Event, str]] = []
            for item in history(events):
                if isinstance(item[0], JobCreated):
                    # a job's first event is stored expecting none before it, as the
                    # job service stores it (readers refuse a JobCreated stored otherwise)
                    await bus.append_pipelined(batch)
                    batch.clear()
                    scope = subjects.job_stream_filter(item[0].job_id)
                    await bus.append(item[0], msg_id=item[1], expect=Expect(scope, 0))
                    continue
                batch.append(item)
                if len(batch) == 5000:
                    await bus.append_pipelined(batch)
                    batch.clear()
            await bus.append_pipelined(batch)
            last = await bus.last_seq()
            print(f"history: {last:,} events, built in {time.perf_counter() - built:.1f}s")
            store = await bus.js.object_store(subjects.DISPATCHER_BUCKET)
            full, resumed = [], []
            for _ in range(rounds):
                with contextlib.suppress(Exception):
                    await store.delete("state")
                elapsed, d = await time_to_ready(bus)
                assert d.resumed_from == 1
                full.append(elapsed)
                elapsed, d = await time_to_ready(bus)
                assert d.resumed_from > 1
                resumed.append(elapsed)
            base, ours = statistics.median(full), statistics.median(resumed)
            print(
                f"full read from sequence 1 (baseline): ready in {base:.2f}s (median of {rounds})"
            )
            print(
                f"resume from snapshot:                 ready in {ours:.2f}s (median of {rounds})"
            )
            print(f"ratio snapshot : full read = {ours / base:.3f}  (goal: under 2 s at 1M events)")
            await bus.close()
        finally:
            nats.kill()
            await nats.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
