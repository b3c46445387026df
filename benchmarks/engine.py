"""End-to-end throughput of no-op flows against raw JetStream publish, in one run.

Baseline: nats-py publishing to a file-backed stream, pipelined (``publish_async``)
and every ack awaited. Ours: one job of N no-op flows through the real path (API-level
job command -> engine process dispatching -> runner process with a no-op executor ->
FlowDone events -> JobCompleted), timed from JobCreated to JobCompleted.
Both run against the same nats-server, one after the other, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.system import local_system
from engine.bus import Bus
from engine.jobs.service import JobCommands
from schemas import subjects
from schemas.events import JobCompleted, JobFailed
from schemas.values import JobSettings, Platform, Target

PAYLOAD = b"x" * 420  # about the size of an encoded FlowDispatched
per_flow: list[tuple[float, float]] = []  # stored (events, job log lines) per flow, by round


async def raw_publish_rate(bus: Bus, count: int) -> float:
    """Messages per second: pipelined publishes, every ack awaited."""
    from nats.js.api import StorageType, StreamConfig

    await bus.js.add_stream(
        StreamConfig(
            name="BENCH", subjects=["bench.>"], storage=StorageType.FILE, duplicate_window=120
        )
    )
    started = time.perf_counter()
    window: list[asyncio.Future[object]] = []
    for n in range(count):
        window.append(await bus.js.publish_async(f"bench.{n % 16}", PAYLOAD))
        if len(window) >= 1000:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)
    elapsed = time.perf_counter() - started
    await bus.js.delete_stream("BENCH")
    return count / elapsed


async def stored(bus: Bus) -> tuple[int, int]:
    """Messages stored so far: events in TB, lines in TB_LOGS."""
    events = await bus.js.stream_info(subjects.EVENTS_STREAM)
    logs = await bus.js.stream_info(subjects.LOGS_STREAM)
    return events.state.messages, logs.state.messages


async def flow_rate(bus: Bus, nats_url: str, flows: int, site_url: str, token_domain: str) -> float:
    """Flows per second from JobCreated to JobCompleted."""
    jobs = JobCommands(bus)
    events_before, lines_before = await stored(bus)
    job_id, created = await jobs.create(
        name="bench",
        targets=[Target(url=f"{site_url}/", flows=flows)],
        settings=JobSettings(instance_count=500, session_seconds=0),
        platform=Platform(),
        actor="bench",
    )
    started = time.perf_counter()
    async for batch in bus.read(created.seq, subjects.job_stream_filter(job_id)):
        for env in batch:
            if isinstance(env.event, JobFailed):
                raise RuntimeError(f"bench job failed: {env.event.reason}")
            if isinstance(env.event, JobCompleted):
                elapsed = time.perf_counter() - started
                if env.event.flows_done != flows:
                    raise RuntimeError(f"{env.event.flows_done} of {flows} flows done")
                await asyncio.sleep(1)  # the runner's last log lines land
                events_after, lines_after = await stored(bus)
                per_flow.append(
                    ((events_after - events_before) / flows, (lines_after - lines_before) / flows)
                )
                return flows / elapsed
    raise RuntimeError("event stream ended")


async def main(flows: int, messages: int, rounds: int) -> None:
    runner = ["--executor", "noop", "--slots", "500"]
    async with local_system(runner) as system:
        bus, site = system.bus, system.site
        await flow_rate(bus, system.url, 200, site.base_url, site.host)  # warm-up
        baseline, ours = [], []
        for _ in range(rounds):
            baseline.append(await raw_publish_rate(bus, messages))
            ours.append(await flow_rate(bus, system.url, flows, site.base_url, site.host))
    raw, flow = statistics.median(baseline), statistics.median(ours)
    print(
        f"raw JetStream publish (pipelined, acked): {raw:,.0f} msg/s "
        f"(median of {rounds} x {messages:,})"
    )
    print(
        f"end-to-end no-op flows (engine + runner): {flow:,.0f} flows/s "
        f"(median of {rounds} x {flows:,})"
    )
    print(f"ratio flows/s : publishes/s = {flow / raw:.2f}  (goal >= 0.25)")
    # context, not the goal: each flow stores its events (FlowDispatched, FlowStarted,
    # FlowDone) and, unless TB_RUNNER_JOB_LOGS=false, the runner's job log lines
    events, lines = per_flow[-1]
    print(
        f"for context: each flow stored {events:.2f} events and {lines:.2f} job log lines;"
        f" {(events + lines) * flow:,.0f} stored messages/s on our path"
        f" = {(events + lines) * flow / raw:.2f} of the raw publish rate"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    asyncio.run(main(a.flows, a.messages, a.rounds))
