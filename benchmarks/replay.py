"""Read-model rebuild against reading the same stream and doing nothing, in one run.

Builds a history of realistic job and flow events through the bus (jobs created with
optimistic concurrency, work items on the dispatch subject, runner reports with their
pages, clicks and retries), then, against the same nats-server:

- the baseline: an ordered consumer (nats-py) that reads every message and does nothing;
- our reader: ``Bus.read_batches`` (decode and check each event, no read model);
- the rebuild: ``projections.replay.rebuild``, every event into every read model.

It prints the rates and the ratio rebuild : baseline (goal >= 0.5). Then it starts the
API (``tb api``, whose projector folds the same history into a fresh read model) as its
own process and reads its resident memory when its projector has applied a tenth of the
history (``--memory-at``, 100,000 for the 1M run) and at the end (goal: within 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from nats.js.api import DeliverPolicy

from cli.nats_server import start_nats_server_on_any_port, wait_for_port
from engine.bus import Bus, Expect
from projections.replay import rebuild
from schemas import subjects
from schemas.events import (
    ClickDone,
    Event,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowStarted,
    JobCompleted,
    JobCreated,
    JobStarted,
    LinkPick,
    PageLeft,
    PageTimings,
    PageVisited,
    RunnerRegistered,
)
from schemas.ids import new_id, short_id
from schemas.values import JobSettings, Platform, Target
from tests.conftest import free_port

HOST = "shop.example.com"
RUNNERS = [f"runner-{n}" for n in range(8)]
FLOWS_PER_JOB = 100
FAILED_FIRST = 0.1  # flows whose first attempt fails and is dispatched again
PIPELINE = 5000


@dataclass
class Clock:
    at: datetime = datetime(2026, 1, 1, tzinfo=UTC)

    def tick(self) -> datetime:
        self.at += timedelta(milliseconds=7)
        return self.at


def flow_events(job: str, n: int, clock: Clock, rng: random.Random) -> Iterator[Event]:
    flow = f"{job}-f{n:05d}"
    url = f"https://{HOST}/products/{n % 40}"
    attempts = 2 if rng.random() < FAILED_FIRST else 1
    for attempt in range(1, attempts + 1):
        runner = rng.choice(RUNNERS)
        ids = {"job_id": job, "flow_id": flow, "attempt": attempt}
        yield FlowDispatched(
            id=new_id(), at=clock.tick(), actor="system", **ids, target_index=0, url=url,
            clicks=1, session_seconds=30, allowed_hosts=[HOST], allowed_ports={HOST: [443]},
            seed=rng.getrandbits(32),
        )  # fmt: skip
        yield FlowStarted(
            id=new_id(), at=clock.tick(), actor=runner, **ids, delivery=1, runner_id=runner
        )
        if attempt < attempts:
            yield FlowFailed(
                id=new_id(), at=clock.tick(), actor=runner, **ids, delivery=1, target_index=0,
                reason="net::ERR_CONNECTION_RESET", runner_id=runner,
            )  # fmt: skip
            continue
        timings = PageTimings(ttfb_ms=rng.uniform(20, 300), load_ms=rng.uniform(300, 2000))
        for page, at_url in enumerate((url, f"https://{HOST}/cart")):
            report = {"id": new_id(), "actor": runner, **ids, "delivery": 1, "n": page}
            yield PageVisited(**report, at=clock.tick(), url=at_url, status=200, timings=timings)
            if page == 0:
                yield ClickDone(
                    id=new_id(), at=clock.tick(), actor=runner, **ids, delivery=1,
                    target_index=0, href=f"https://{HOST}/cart",
                    link=LinkPick(index=3, candidates=12),
                )  # fmt: skip
            report["id"] = new_id()
            yield PageLeft(
                **report, at=clock.tick(), url=at_url, dwell_ms=rng.randrange(2000, 9000),
                scrolls=[rng.randrange(100, 600) for _ in range(6)],
                pauses_ms=[rng.randrange(200, 900) for _ in range(6)],
            )  # fmt: skip
        yield FlowDone(
            id=new_id(), at=clock.tick(), actor=runner, **ids, delivery=1, runner_id=runner,
            target_index=0, clicks_done=1, duration_ms=rng.randrange(5000, 30000),
        )  # fmt: skip


def history(events: int, seed: int = 1) -> Iterator[Event]:
    """About ``events`` events: runners register, then jobs of 100 flows run to the end."""
    rng, clock = random.Random(seed), Clock()
    for runner in RUNNERS:
        yield RunnerRegistered(
            id=new_id(), at=clock.tick(), actor=runner, runner_id=runner,
            platform=Platform(), slots=8, hostname=runner, version="bench",
        )  # fmt: skip
    produced = len(RUNNERS)
    while produced < events:
        job = short_id("job")
        common = {"actor": "api", "job_id": job}
        yield JobCreated(
            id=new_id(), at=clock.tick(), **common, name=f"bench {job}",
            targets=[Target(url=f"https://{HOST}/", flows=FLOWS_PER_JOB, clicks=1)],
            settings=JobSettings(instance_count=8),
        )  # fmt: skip
        yield JobStarted(
            id=new_id(), at=clock.tick(), **common, flows_total=FLOWS_PER_JOB,
            allowed_hosts=[HOST],
        )  # fmt: skip
        produced += 2
        for n in range(FLOWS_PER_JOB):
            for event in flow_events(job, n, clock, rng):
                produced += 1
                yield event
        yield JobCompleted(
            id=new_id(), at=clock.tick(), **common, flows_done=FLOWS_PER_JOB, flows_failed=0
        )
        produced += 1


def msg_id(event: Event) -> str:
    return new_id()  # every event here is stored once: a fresh id per event


async def build_history(bus: Bus, events: int, within: float) -> None:
    """Store the history as the system stores it, within ``within`` seconds."""
    batch: list[tuple[Event, str]] = []
    async with asyncio.timeout(within):
        for event in history(events):
            if isinstance(event, JobCreated):
                # a job's first event is stored expecting none before it, as the job
                # service stores it (readers refuse a JobCreated stored otherwise)
                await bus.append_pipelined(batch)
                batch.clear()
                scope = subjects.job_stream_filter(event.job_id)
                await bus.append(event, msg_id=msg_id(event), expect=Expect(scope, 0))
                continue
            batch.append((event, msg_id(event)))
            if len(batch) == PIPELINE:
                await bus.append_pipelined(batch)
                batch.clear()
        await bus.append_pipelined(batch)


async def raw_read(bus: Bus, last: int) -> None:
    """An ordered consumer receives every message and does nothing with them."""
    done = asyncio.Event()
    seen = 0

    async def count(_: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= last:
            done.set()

    sub = await bus.js.subscribe(
        "tb.>",
        stream=subjects.EVENTS_STREAM,
        cb=count,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=1_000_000,
    )
    try:
        await done.wait()
    finally:
        await sub.unsubscribe()


async def reader_only(bus: Bus, last: int) -> None:
    """Our reader decodes and checks every event, applying none."""
    batches = bus.read_batches(1, follow=False)
    try:
        async for batch in batches:
            if batch.last_seq >= last:
                break
    finally:
        await batches.aclose()


@dataclass
class Run:
    wall: float
    cpu: float  # of this process (every thread) and its children (a rebuild's fold process)
    server_cpu: float  # of the nats-server serving the read

    @staticmethod
    def median(runs: list[Run]) -> Run:
        return Run(
            statistics.median(r.wall for r in runs),
            statistics.median(r.cpu for r in runs),
            statistics.median(r.server_cpu for r in runs),
        )

    def line(self, what: str, events: int) -> str:
        return (
            f"{what}: {events / self.wall:,.0f} events/s,"
            f" {self.cpu / events * 1e6:,.0f} µs CPU per event here (children included),"
            f" nats-server {self.server_cpu / events * 1e6:,.0f} µs"
        )


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def cpu_seconds_of(pid: int) -> float:
    """CPU time of a running process (user and system, from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(work: Awaitable[object], server: int, within: float) -> Run:
    wall, cpu, server_cpu = time.perf_counter(), cpu_seconds(), cpu_seconds_of(server)
    async with asyncio.timeout(within):  # a reader that stalls ends the run, not hangs it
        await work
    return Run(time.perf_counter() - wall, cpu_seconds() - cpu, cpu_seconds_of(server) - server_cpu)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def projection_seq(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # 503 while no runner is online: still says it
        body = err.read()
    return int(json.loads(body)["projection_seq"])


async def api_memory(nats_url: str, db: Path, last: int, at: int, within: float) -> None:
    """Resident memory of a ``tb api`` process when its projector passes ``at`` and at
    ``last``: the process a replica restarts with an empty read model."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "api", "--nats-url", nats_url,
        "--port", str(port), "--db", str(db),
        env={**os.environ, "TB_LOG_LEVEL": "warning", "TB_ADMIN_PASSWORD": secrets.token_urlsafe()},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(within):
            started = asyncio.ensure_future(wait_for_port("127.0.0.1", port, timeout=60))
            await asyncio.wait(
                [started, asyncio.ensure_future(proc.wait())], return_when="FIRST_COMPLETED"
            )
            if proc.returncode is not None:
                assert proc.stderr is not None
                raise RuntimeError(f"tb api stopped: {(await proc.stderr.read()).decode()[-2000:]}")
            await started
            started = time.perf_counter()
            early = 0
            while (seq := await asyncio.to_thread(projection_seq, url)) < last:
                if not early and seq >= at:
                    early, early_seq = rss_bytes(proc.pid), seq
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            end = rss_bytes(proc.pid)
        print(
            f"tb api replaying into an empty read model: {last / elapsed:,.0f} events/s;"
            f" RSS {early / 2**20:.1f} MiB after {early_seq:,} events,"
            f" {end / 2**20:.1f} MiB after {last:,}"
        )
        print(f"ratio RSS end : early = {end / early:.3f}  (goal: within 10%, i.e. <= 1.10)")
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def engine_memory(nats_url: str, last: int, at: int, within: float) -> None:
    """Resident memory of a ``tb engine`` process whose dispatcher reads the whole history
    at start (no snapshot yet): at its first progress line past ``at`` and when ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "engine", "--nats-url", nats_url,
        env={**os.environ, "TB_LOG_LEVEL": "info", "TB_LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    early = early_seq = 0
    try:
        async with asyncio.timeout(within):
            started = time.perf_counter()
            while line := await proc.stderr.readline():
                if b"dispatcher.catching_up" not in line and b"dispatcher.ready" not in line:
                    continue
                position = int(json.loads(line)["position"])
                if not early and position >= at:
                    early, early_seq = rss_bytes(proc.pid), position
                if b"dispatcher.ready" in line:
                    break
            else:
                raise RuntimeError("tb engine stopped before its dispatcher was ready")
            elapsed = time.perf_counter() - started
            end = rss_bytes(proc.pid)
        print(
            f"tb engine reading the history at start: {last / elapsed:,.0f} events/s;"
            f" RSS {early / 2**20:.1f} MiB at {early_seq:,} events,"
            f" {end / 2**20:.1f} MiB at {last:,}"
        )
        if early:
            print(f"ratio RSS end : early = {end / early:.3f}  (goal: within 10%, i.e. <= 1.10)")
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def main(events: int, memory_at: int, rounds: int, build_timeout: float) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        nats, port = await start_nats_server_on_any_port(Path(tmp) / "js")
        url = f"nats://127.0.0.1:{port}"
        try:
            async with await Bus.connect(url, name="bench") as bus:
                await bus.provision()
                built = time.perf_counter()
                await build_history(bus, events, build_timeout)
                last = await bus.last_seq()
                print(f"history: {last:,} events, built in {time.perf_counter() - built:.1f}s")

                # the phases take turns, round after round, and each figure is the
                # median: load that comes and goes on the machine hits all of them alike
                runs: dict[str, list[Run]] = {"raw": [], "ours": [], "rebuilt": []}
                for n in range(rounds):
                    for name, work in (("raw", raw_read), ("ours", reader_only)):
                        run = await measured(work(bus, last), nats.pid, build_timeout)
                        runs[name].append(run)
                    db = Path(tmp) / f"read{n}.db"
                    run = await measured(rebuild(bus, db), nats.pid, build_timeout)
                    runs["rebuilt"].append(run)
                    size = db.stat().st_size
                    db.unlink()
                raw, ours, rebuilt = (Run.median(runs[k]) for k in ("raw", "ours", "rebuilt"))
                print(f"medians of {rounds} rounds, taking turns:")
                print(raw.line("ordered consumer, doing nothing (baseline)", last))
                print(ours.line("our reader (decode and check, no read model)", last))
                print(rebuilt.line("rebuild into the read models", last))
                print(f"  ({rebuilt.wall:.1f}s, read model {size / 2**20:,.0f} MiB)")
                print(
                    f"ratio rebuild : baseline = {raw.wall / rebuilt.wall:.3f}  (goal >= 0.5);"
                    f" by CPU time {raw.cpu / rebuilt.cpu:.3f}"
                )
            await api_memory(url, Path(tmp) / "api.db", last, memory_at, within=build_timeout)
            await engine_memory(url, last, memory_at, within=build_timeout)
        finally:
            nats.kill()
            await nats.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="history size (>= 200,000)")
    parser.add_argument(
        "--memory-at", type=int, default=None, help="early RSS reading (default: a tenth)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of the three reads")
    parser.add_argument(
        "--timeout", dest="build_timeout", type=float, default=1800.0,
        help="seconds each phase may take (building the history, each read, the API replay)",
    )  # fmt: skip
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        memory_at = args.memory_at or args.events // 10
        asyncio.run(main(args.events, memory_at, args.rounds, args.build_timeout))
