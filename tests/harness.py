"""An embedded TrafficBuster for tests: real bus, engine and projector; runners in or out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from agents.executor import AllowedHosts, FlowReport, FlowResult
from engine.bus import Appended, Batch, Bus, Expect
from engine.consent import ConsentCommands
from engine.dispatcher import Dispatcher
from engine.jobs.service import JobCommands
from projections import queries
from projections.db import connect
from projections.projector import Projector
from projections.queries import JobView
from schemas import subjects
from schemas.events import (
    Envelope,
    Event,
    FlowDispatched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobRefused,
    JobStarted,
    decode_event,
)
from schemas.flow_lifecycle import FlowProgress, FlowState, flow_transition
from schemas.values import TERMINAL_JOB_STATUSES, ConsentCaps, JobSettings, Platform, Target
from tests.sites import RecordingSite, recording_site


@dataclass
class Embedded:
    bus: Bus
    nats_url: str
    db_path: Path
    projector: Projector
    jobs: JobCommands
    consents: ConsentCommands
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    async def authorise(
        self, host: str, caps: ConsentCaps | None = None, *, on: RecordingSite | None = None
    ) -> None:
        """Claim and verify through the real well-known path: on the site ``on`` (so its
        port is among the consent's, as a browser flow needs), else on a site of its own
        (enough where no browser goes)."""
        token, _ = await self.consents.claim(host, "test")
        if on is None:
            with recording_site(host, token=token) as site:
                await self.consents.verify(host, site.base_url, "test", caps=caps)
            return
        on.token, seen = token, len(on.requests)
        await self.consents.verify(host, on.base_url, "test", caps=caps)
        del on.requests[seen:], on.arrived[seen:]  # the check is no traffic of a flow

    async def create_job(self, targets: list[Target], **settings: object) -> str:
        job_id, _ = await self.jobs.create(
            name="test",
            targets=targets,
            settings=JobSettings(**settings),  # type: ignore[arg-type]
            platform=Platform(),
            actor="test",
        )
        return job_id

    async def job(self, job_id: str) -> JobView | None:
        db = await connect(self.db_path, readonly=True)
        try:
            return await queries.get_job(db, job_id)
        finally:
            await db.close()

    async def wait_job(
        self, job_id: str, until: Callable[[JobView], bool], timeout: float = 60
    ) -> JobView:
        """Await projector updates (never sleep) until the job view satisfies ``until``."""
        updates = self.projector.subscribe()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    view = await self.job(job_id)
                    if view is not None and until(view):
                        return view
                    await updates.get()
        finally:
            self.projector.unsubscribe(updates)

    async def wait_terminal(self, job_id: str, timeout: float = 60) -> JobView:
        return await self.wait_job(job_id, lambda v: v.status in TERMINAL_JOB_STATUSES, timeout)

    def run(self, coro: object, name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    async def spawn_engine(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "engine",
            "--nats-url",
            self.nats_url,
            env={**os.environ, "TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": "3"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.procs.append(proc)
        return proc

    async def spawn_runner(
        self, *args: str, env: dict[str, str] | None = None
    ) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "runner",
            "--nats-url",
            self.nats_url,
            *args,
            env={**os.environ, "TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": "3", **(env or {})},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc


@contextlib.asynccontextmanager
async def embedded(
    bus: Bus, nats_url: str, tmp_path: Path, *, dispatcher: bool = True
) -> AsyncIterator[Embedded]:
    projector = Projector(bus, tmp_path / "read.db")
    await projector.start()
    tb = Embedded(
        bus, nats_url, tmp_path / "read.db", projector, JobCommands(bus), ConsentCommands(bus)
    )
    await bus.ensure_dispatch_consumer("linux", "chromium")
    if dispatcher:
        tb.run(Dispatcher(bus).run(), "dispatcher")
    try:
        yield tb
    finally:
        for proc in tb.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for task in tb.tasks:
            task.cancel()
        await asyncio.gather(*tb.tasks, return_exceptions=True)
        await projector.stop()


class SteadyExecutor:
    """Flows that take a little while, so a crash lands in the middle of a job."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        await asyncio.sleep(self.seconds)
        return FlowResult(clicks_done=item.clicks, pages=1)


async def dispatches(bus: Bus, job_id: str) -> Counter[tuple[str, int]]:
    seen: Counter[tuple[str, int]] = Counter()
    async for batch in bus.read(1, "tb.dispatch.>", follow=False):
        for env in batch:
            if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id:
                seen[(env.event.flow_id, env.event.attempt)] += 1
    return seen


async def log_until(
    bus: Bus,
    stream_filter: str | list[str],
    until: Callable[[Envelope], bool],
    timeout: float = 60,
) -> list[Envelope]:
    """Events on ``stream_filter`` from sequence 1 up to the first that satisfies ``until``
    (awaited as they are stored, never polled)."""
    seen: list[Envelope] = []
    async with asyncio.timeout(timeout):
        async for batch in bus.read(1, stream_filter):
            for env in batch:
                seen.append(env)
                if until(env):
                    return seen
    raise AssertionError("the log ended")


def lifecycle_counts(envelopes: list[Envelope], max_attempts: int) -> tuple[int, int]:
    """A job's done and failed counts by the one flow rule, folded straight from its events."""
    flows: dict[str, FlowState | None] = {}
    done = failed = 0
    for env in envelopes:
        e = env.event
        if isinstance(e, JobCompleted | JobFailed | JobCancelled | JobRefused):
            break
        if isinstance(e, FlowProgress):
            step = flow_transition(flows.get(e.flow_id), e, max_attempts=max_attempts)
            flows[e.flow_id] = step.state
            done, failed = done + step.done, failed + step.failed
    return done, failed


class FlakyBus(Bus):
    """A real bus whose next calls fail the way they do while NATS is briefly unavailable.

    ``faults`` lists, per method, the errors its next calls raise, in order. A failing
    ``append_pipelined`` first stores its events (the acks are what got lost).
    """

    faults: dict[str, list[Exception]]

    def _fault(self, method: str) -> None:
        pending = self.faults.get(method)
        if pending:
            raise pending.pop(0)

    async def last_seq(self) -> int:
        self._fault("last_seq")
        return await super().last_seq()

    async def append(self, event: Event, *, msg_id: str, expect: Expect | None = None) -> Appended:
        self._fault("append")
        return await super().append(event, msg_id=msg_id, expect=expect)

    async def append_pipelined(self, items: Sequence[tuple[Event, str]]) -> list[Appended]:
        if self.faults.get("append_pipelined"):
            await super().append_pipelined(items)
            self._fault("append_pipelined")
        return await super().append_pipelined(items)

    def read_batches(self, start_seq: int, *args: Any, **kwargs: Any) -> Any:
        return self._after_one(super().read_batches(start_seq, *args, **kwargs))

    async def _after_one(self, batches: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
        async for batch in batches:
            yield batch
            self._fault("read_batches")  # the reader fails once it has had a batch


@contextlib.asynccontextmanager
async def flaky_bus(url: str, faults: dict[str, list[Exception]]) -> AsyncIterator[FlakyBus]:
    bus = await FlakyBus.connect(url, name="flaky")
    bus.faults = faults
    try:
        yield bus
    finally:
        await bus.close()


class WorkItemsSent:
    """Every work item published, as core NATS delivers it: duplicates included.

    The stream cannot show a second publish of one work item (JetStream drops it by its
    msg-id), so a count taken from the stream is always one; this one can be two.
    """

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()  # msg-id -> times published
        self.attempts: dict[str, int] = {}  # flow id -> highest attempt published

    async def start(self, bus: Bus) -> WorkItemsSent:
        await bus.nc.subscribe(subjects.ALL_DISPATCH, cb=self._on_item)
        await bus.nc.flush()  # the server knows the subscription before anything is sent
        return self

    async def _on_item(self, msg: Msg) -> None:
        self.sent[(msg.headers or {}).get(subjects.MSG_ID_HEADER, "")] += 1
        item = decode_event(msg.data)
        if isinstance(item, FlowDispatched):
            self.attempts[item.flow_id] = max(self.attempts.get(item.flow_id, 0), item.attempt)

    def of_job(self, job_id: str) -> dict[str, int]:
        return {f: a for f, a in self.attempts.items() if f.startswith(f"{job_id}_")}


async def start_outcomes(bus: Bus, job_ids: Sequence[str], timeout: float = 20) -> list[Event]:
    """How the engine decided each job's start: its JobStarted or JobRefused, in order."""
    outcomes: list[Event] = []
    for job_id in job_ids:
        history = await log_until(
            bus,
            subjects.job_stream_filter(job_id),
            lambda e: isinstance(e.event, JobStarted | JobRefused),
            timeout=timeout,
        )
        outcomes.append(history[-1].event)
    return outcomes
