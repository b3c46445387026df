"""Seeded interleavings of everything that can happen to a job, with real processes.

Pause, resume, cancel, consent revocation and re-verification, SIGKILLed runners,
engine and nats-server, runners cut off from NATS: whatever the order, every flow ends
with exactly one counted outcome, each job reaches a terminal status whose counts are
the read model's and the fold of its log by the one flow rule, cancelled and paused
jobs start nothing new, and a revoked host gets nothing more.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import nats.errors
import pytest

from engine.bus import Bus, ConcurrencyConflict
from engine.errors import Rejected
from schemas import subjects
from schemas.events import (
    CONSENT_REVOKED,
    ConsentGiven,
    ConsentRevoked,
    Envelope,
    FlowFailed,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobPaused,
    JobResumed,
)
from schemas.values import TERMINAL_JOB_STATUSES, Target
from tests.conftest import NatsServer
from tests.harness import Embedded, embedded, lifecycle_counts
from tests.runner_proc import read_runs
from tests.test_runner import Relay

T = TypeVar("T")

HOSTS = ("127.0.0.1", "127.0.0.2")
ENV = {"TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": "3", "TB_STALL_MARGIN": "1"}
FLOW_SECONDS = 0.5
STOP_WITHIN = 1.0  # cancel and revocation stop a connected runner's flows within this
SETTLE = 1.0  # a pause or cancel reaches every connected runner within this


def append_to(path: Path) -> IO[bytes]:
    """A log file for a child process (the child holds it; ours closes at exit)."""
    return path.open("ab")


@dataclass
class RunnerProc:
    name: str
    relay: Relay
    proc: asyncio.subprocess.Process | None = None
    cut: list[tuple[float, float]] = field(default_factory=list)  # windows cut off or dead


@dataclass
class Chaos:
    tb: Embedded
    nats: NatsServer
    tmp: Path
    rng: random.Random
    record: Path
    engine: asyncio.subprocess.Process | None = None
    runners: list[RunnerProc] = field(default_factory=list)
    jobs: dict[str, list[str]] = field(default_factory=dict)  # job id -> hosts
    revoked: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)
    did: list[str] = field(default_factory=list)
    down: list[tuple[float, float]] = field(default_factory=list)  # engine or nats away

    async def spawn_engine(self) -> None:
        self.engine = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "engine", "--nats-url", self.nats.url,
            env={**os.environ, **ENV},
            stdout=append_to(self.tmp / "engine.log"),
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    async def spawn_runner(self, r: RunnerProc) -> None:
        r.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.runner_proc", "--nats-url", r.relay.url,
            "--seconds", str(FLOW_SECONDS), "--slots", "2", "--runner-id", r.name,
            "--record", str(self.record),
            env={**os.environ, **ENV},
            stdout=append_to(self.tmp / f"{r.name}.log"),
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    async def start(self, runners: int) -> None:
        for host in HOSTS:
            await self.tb.authorise(host)
        await self.spawn_engine()
        for n in range(runners):
            relay = Relay(self.nats.port)
            await relay.start()
            r = RunnerProc(f"runner-{n}", relay)
            self.runners.append(r)
            await self.spawn_runner(r)

    async def create(self, hosts: list[str], flows: int) -> str:
        targets = [Target(url=f"http://{h}:9/", flows=flows) for h in hosts]
        job_id = await self.tb.create_job(targets, instance_count=3, session_seconds=1)
        self.jobs[job_id] = hosts
        return job_id

    # -- what can happen --------------------------------------------------------------

    async def act(self) -> None:
        kind = self.rng.choice(
            ["pause", "resume", "cancel", "revoke", "reverify", "kill_runner", "kill_engine",
             "kill_nats", "cut_runner", "resume"]
        )  # fmt: skip
        job_id = self.rng.choice(sorted(self.jobs))
        host = self.rng.choice(HOSTS)
        r = self.rng.choice(self.runners)
        about = {"runner": r.name, "voke": host, "verify": host}.get(
            next((k for k in ("runner", "voke", "verify") if k in kind), ""), job_id
        )
        self.did.append(f"{time.time():.2f} {kind} {about}")
        if kind == "pause":
            await self.command(lambda: self.tb.jobs.pause(job_id, "chaos", reason="chaos"))
        elif kind == "resume":
            await self.command(lambda: self.tb.jobs.resume(job_id, "chaos"))
        elif kind == "cancel" and not self.cancelled:
            from engine.jobs.decider import CancelJob

            if await self.command(lambda: self.tb.jobs.execute(CancelJob(job_id), "chaos")):
                self.cancelled.add(job_id)
        elif kind == "revoke" and host not in self.revoked:
            if await self.command(lambda: self.tb.consents.revoke(host, "chaos", "chaos")):
                self.revoked.add(host)
        elif kind == "reverify" and host in self.revoked:
            await self.reverify(host)
        elif kind == "kill_runner":
            await self.kill_runner(r, pause=self.rng.uniform(0, 2))
        elif kind == "kill_engine":
            assert self.engine is not None
            began = time.time()
            self.engine.send_signal(signal.SIGKILL)
            await self.engine.wait()
            await asyncio.sleep(self.rng.uniform(0, 2))
            await self.spawn_engine()
            self.down.append((began, time.time()))
        elif kind == "kill_nats":
            began = time.time()
            await self.nats.kill()
            await asyncio.sleep(self.rng.uniform(0, 1))
            await self.nats.start()
            self.down.append((began, time.time()))
        elif kind == "cut_runner":
            began = time.time()
            await r.relay.cut()
            await asyncio.sleep(self.rng.uniform(0.5, 4))
            await r.relay.start()
            r.cut.append((began, time.time()))

    async def kill_runner(self, r: RunnerProc, pause: float) -> None:
        assert r.proc is not None
        began = time.time()
        r.proc.send_signal(signal.SIGKILL)
        await r.proc.wait()
        await asyncio.sleep(pause)
        await self.spawn_runner(r)
        r.cut.append((began, time.time() + 3))  # its items come back after the ack wait

    async def reverify(self, host: str) -> None:
        async def again() -> None:
            await self.tb.authorise(host)

        if await self.command(again):
            self.revoked.discard(host)

    async def command(self, call: Callable[[], Awaitable[T]]) -> bool:
        """Carry out a command as a client would: retried through NATS trouble; False when
        the system refuses it (a 4xx)."""
        async with asyncio.timeout(60):
            while True:
                try:
                    await call()
                    return True
                except Rejected:
                    return False
                except (nats.errors.Error, ConcurrencyConflict, TimeoutError, OSError):
                    await asyncio.sleep(0.3)

    async def finish(self) -> None:
        """Everything back to normal: hosts verified, paused jobs resumed."""
        for host in sorted(self.revoked):
            await self.reverify(host)
        for job_id in self.jobs:
            view = await self.tb.job(job_id)
            if view is not None and view.status == "paused":
                await self.command(lambda j=job_id: self.tb.jobs.resume(j, "chaos"))

    async def stop(self) -> None:
        for p in [self.engine, *(r.proc for r in self.runners)]:
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()


async def job_log(bus: Bus, job_id: str) -> list[Envelope]:
    return [
        env
        async for batch in bus.read(
            1, [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")],
            follow=False,
        )
        for env in batch
    ]  # fmt: skip


async def all_events(bus: Bus, stream_filter: str) -> list[Envelope]:
    return [env async for batch in bus.read(1, stream_filter, follow=False) for env in batch]


def away(windows: list[tuple[float, float]], at: float, slack: float) -> bool:
    return any(a - slack <= at <= b + slack for a, b in windows)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_any_interleaving_ends_every_job_exactly(
    seed: int, bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    record = tmp_path / "runs.jsonl"
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        chaos = Chaos(tb, nats_server, tmp_path, rng, record)
        try:
            await chaos.start(runners=2)
            await chaos.create([HOSTS[0]], 24)
            await chaos.create([HOSTS[1]], 24)
            await chaos.create(list(HOSTS), 12)
            for _ in range(10):
                await asyncio.sleep(rng.uniform(0.2, 2.0))
                await chaos.act()
            await chaos.finish()
            views = {}
            for job_id in chaos.jobs:
                views[job_id] = await tb.wait_job(
                    job_id, lambda v: v.status in TERMINAL_JOB_STATUSES, timeout=180
                )
        finally:
            await chaos.stop()
            print("\n".join(chaos.did))
        logs = {job_id: await job_log(bus, job_id) for job_id in chaos.jobs}
        consents = await all_events(bus, "tb.consent.>")
    runs = read_runs(record)
    problems: list[str] = []
    for job_id, view in views.items():
        history = logs[job_id]
        ended = [e for e in history if isinstance(e.event, JobCompleted | JobFailed | JobCancelled)]
        if len(ended) != 1:
            problems.append(f"{job_id}: {len(ended)} end events")
            continue
        end = ended[0].event
        folded = lifecycle_counts(history, 3)
        counts = (view.flows_done, view.flows_failed)
        if isinstance(end, JobCompleted | JobFailed):
            if (end.flows_done, end.flows_failed) != counts or counts != folded:
                problems.append(f"{job_id}: ended {end} read {counts} fold {folded}")
            if sum(counts) != view.flows_total:
                problems.append(f"{job_id}: {counts} of {view.flows_total} flows")
        elif counts != folded:
            problems.append(f"{job_id}: cancelled, read {counts} fold {folded}")
        # nothing starts once paused or cancelled (on a runner that heard of it)
        stops = [
            (e.event.at.timestamp(), type(e.event).__name__)
            for e in history
            if isinstance(e.event, JobPaused | JobCancelled)
        ]
        resumes = [e.event.at.timestamp() for e in history if isinstance(e.event, JobResumed)]
        for run in (r for r in runs if r.job_id == job_id):
            cut = next(x.cut for x in chaos.runners if x.name == run.runner)
            for at, kind in stops:
                resumed = any(at < r < run.started for r in resumes)
                if at + SETTLE < run.started and not resumed and not away(cut, run.started, 4.0):
                    problems.append(f"{job_id}: {run.flow_id} started after {kind}: {run}")
                ran_on = run.started < at and (run.ended or 1e12) > at + STOP_WITHIN
                if kind == "JobCancelled" and ran_on and not away(cut, at, 4.0):
                    problems.append(f"{job_id}: {run.flow_id} ran on after cancel: {run}")
        # flows failed for a revoked consent are never retried
        revoked = {
            e.event.flow_id
            for e in history
            if isinstance(e.event, FlowFailed) and e.event.reason == CONSENT_REVOKED
        }
        for e in history:
            if isinstance(e.event, FlowFailed) and e.event.flow_id in revoked and e.event.retryable:
                problems.append(f"{job_id}: {e.event.flow_id} failed retryable after revocation")
    # a revoked host gets nothing new, and what ran on it stops
    windows: dict[str, list[tuple[float, float]]] = {h: [] for h in HOSTS}
    for e in consents:
        host = getattr(e.event, "domain", "")
        if isinstance(e.event, ConsentRevoked):
            windows[host].append((e.event.at.timestamp(), float("inf")))
        elif isinstance(e.event, ConsentGiven) and windows[host]:
            began, until = windows[host][-1]
            if until == float("inf"):
                windows[host][-1] = (began, e.event.at.timestamp())
    for run in runs:
        host = chaos.jobs[run.job_id][int(run.flow_id.rsplit("_", 2)[1])]
        cut = next(x.cut for x in chaos.runners if x.name == run.runner)
        for began, until in windows[host]:
            if began + SETTLE < run.started < until and not away(cut, run.started, 4.0):
                problems.append(f"{host}: {run.flow_id} started while revoked: {run}")
            ran_on = run.started < began and (run.ended or 1e12) > began + 2.0
            if ran_on and not away(cut, began, 4.0):
                problems.append(f"{host}: {run.flow_id} ran on after revocation: {run}")
    print("\n".join(problems))
    assert problems == []
