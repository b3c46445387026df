"""The runner agent: composes intake, control, flow runs and presence; drains on stop.

Delivery is at-least-once: a flow whose runner dies is redelivered after the ack
wait and may report twice; the msg-ids make a replayed publish a no-op, and the
read side counts flows, not events.

A stop drains: intake stops at once, work items not started yet are handed back at
once (a nak without delay: another runner takes them now), started flows get the
drain grace to finish, and what still runs after it is handed back the same way.
The console says what happens, one line per step and per flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from agents.backoff import Backoff
from agents.control import Control
from agents.executor import FlowExecutor
from agents.flow_run import FlowRun, Outcome, Stop
from agents.intake import Intake, SlotKey, Work
from agents.job_log import JobLog
from agents.presence import Load, Presence
from agents.reporter import FlowReporter
from engine.bus import Bus
from schemas.ids import short_id
from schemas.values import Platform

log = structlog.get_logger("tb.agent")

RELEASE_GRACE = 10.0  # seconds stopped flows get to close their browsers and hand back
DRAIN_GRACE = 30.0  # seconds started flows get to finish once the runner is told to stop
JOBS_REMEMBERED = 256  # jobs whose first flow here was announced (bounded: a runner lives long)


@dataclass
class Runner:
    bus: Bus
    executor: FlowExecutor
    platform: Platform = Platform()
    slots: int = 2
    # work taken per pull: a bounded batch keeps flows moving through the pipeline in
    # several smaller waves (measured: ~100-150 beats both all free slots and ~25)
    fetch_batch: int = 128
    runner_id: str = field(default_factory=lambda: short_id("runner"))
    browser_version: str = ""  # as launched: advertised with the platform
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float = 5.0
    drain_grace: float = DRAIN_GRACE
    job_log_lines: bool = True  # a line in the job's log per flow received and ended
    # told each milestone (today: "Registered as runner: <id>"), for whoever embeds a runner
    announce: Callable[[str], None] = lambda line: None
    completed: int = 0  # flow runs that ended done
    tally: Counter[Outcome] = field(default_factory=Counter)  # how the others ended
    runs: dict[SlotKey, FlowRun] = field(default_factory=dict)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _watching: int = 0  # callers of wait_until (only then is a change worth telling)
    _jobs_seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.intake = Intake(
            self.bus,
            self.platform,
            slots=self.slots,
            fetch_batch=self.fetch_batch,
        )
        self.control = Control(
            self.bus, on_job_ended=self._job_ended, on_host_revoked=self._host_revoked
        )
        # reports, acks and loads of the runner's flows: one line per episode of trouble
        self.nats_trouble = Backoff("runner.nats", base=0.2, cap=5.0)
        self.job_log = JobLog(self.bus, self.runner_id, enabled=self.job_log_lines)

    @property
    def failed(self) -> int:
        return self.tally[Outcome.FAILED] + self.tally[Outcome.REVOKED]

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, checked whenever a flow run starts or ends."""
        self._watching += 1
        try:
            while not condition():
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._watching -= 1

    async def wait_idle(self) -> None:
        """Return once no flow is running (cancelled, finished or released)."""
        await self.wait_until(lambda: not self.runs)

    def stop(self) -> None:
        """Drain: stop intake and hand back what has not started; started flows get
        ``drain_grace`` seconds to finish, then they are handed back too. Asked again
        (a second Ctrl-C), it hands everything back now."""
        if self._stopping.is_set():
            if self.runs:
                log.info("Stop again: handing back now", flows=len(self.runs))
            for run in list(self.runs.values()):
                run.stop(Stop.RELEASED)
            return
        self._stopping.set()
        self.intake.stop()
        for run in list(self.runs.values()):
            run.release_unless_started()

    async def run(self) -> None:
        self.job_log.runner_id = self.runner_id  # the embedder may have named the runner
        presence = Presence(
            self.bus,
            self.runner_id,
            self.platform,
            self.slots,
            self._load,
            interval=self.heartbeat_interval,
            browser_version=self.browser_version,
            labels=self.labels,
        )
        await self.executor.start()
        try:
            if not await self._unless_stopped(self._start_up(presence)):
                return  # stopped while NATS or the streams were not there yet
            p = self.platform
            log.info(
                "Registered as runner",
                runner_id=self.runner_id,
                os=p.os,
                browser=p.browser,
                slots=self.slots,
            )
            self.announce(f"Registered as runner: {self.runner_id}")
            heartbeat = asyncio.create_task(presence.run(), name="runner-heartbeat")
            try:
                async with contextlib.aclosing(self.intake.items()) as items:
                    async for work in items:
                        self._start(work)
                await presence.draining()
                await self._drain()
            finally:
                presence.stop()
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                await self._release_all()
                await presence.deregister()
        finally:
            await self.job_log.close()
            await self.control.stop()
            await self.executor.close()

    async def _start_up(self, presence: Presence) -> None:
        await self.intake.open()
        await self.control.start()
        await presence.register()

    async def _unless_stopped(self, step: Coroutine[Any, Any, None]) -> bool:
        """Run ``step`` to its end, unless ``stop`` comes first (then False)."""
        task = asyncio.ensure_future(step)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stopping, return_exceptions=True)
        if task.cancelled():
            return False
        task.result()  # what the step raised, if it did
        return True

    def _new_job(self, job_id: str) -> None:
        """The first flow of a job this runner takes: said once per job, as operators
        of runners are used to reading it."""
        self._jobs_seen[job_id] = None
        if len(self._jobs_seen) > JOBS_REMEMBERED:
            self._jobs_seen.popitem(last=False)
        log.info("Received new job", job_id=job_id)
        log.info("Starting job", job_id=job_id)

    def _start(self, work: Work) -> None:
        item = work.item
        received = time.monotonic()
        if item.job_id not in self._jobs_seen:
            self._new_job(item.job_id)
        log.info(
            "Flow received",
            job_id=item.job_id,
            flow_id=item.flow_id,
            attempt=item.attempt,
            delivery=work.delivery,
            url=item.url,
        )
        self.job_log.received(item, work.delivery)
        reporter = FlowReporter(self.bus, item, self.runner_id, work.msg, work.delivery)
        run = FlowRun(work, reporter, self.executor, self.control, self.nats_trouble)
        key = work.key
        self.runs[key] = run
        if self._watching:
            self._changed.set()
        if self._stopping.is_set():
            run.stop(Stop.RELEASED)  # came with the last pull: handed back unstarted
        task = run._task = asyncio.create_task(run.run())

        def finished(task: asyncio.Task[Outcome]) -> None:
            self.runs.pop(key, None)
            self.intake.free(key)
            if self._watching:
                self._changed.set()
            if task.cancelled():
                return
            if (err := task.exception()) is not None:
                # not acked: JetStream redelivers the work item after the ack wait
                log.error("flow.unreported", flow_id=key.flow_id, error=repr(err))
                self.tally[Outcome.UNREPORTED] += 1
                seconds = time.monotonic() - received
                self.job_log.finished(item, key.delivery, "unreported", seconds, repr(err))
                return
            if (outcome := task.result()) is Outcome.DONE:
                self.completed += 1  # the common case: no enum hashed
            else:
                self.tally[outcome] += 1
            seconds = time.monotonic() - received
            log.info(
                "Flow finished",
                job_id=item.job_id,
                flow_id=key.flow_id,
                attempt=key.attempt,
                delivery=key.delivery,
                outcome=outcome.value,
                seconds=round(seconds, 3),
                **({"reason": run.detail} if run.detail else {}),
            )
            self.job_log.finished(item, key.delivery, outcome.value, seconds, run.detail)

        task.add_done_callback(finished)

    def _job_ended(self, job_id: str) -> None:
        for run in list(self.runs.values()):
            if run.item.job_id == job_id:
                run.stop(Stop.ENDED)

    def _host_revoked(self, host: str) -> None:
        for run in list(self.runs.values()):
            run.revoke(host)

    def _load(self) -> Load:
        return Load(
            running=len(self.runs),
            completed=self.completed,
            failed=self.failed,
            draining=self._stopping.is_set(),
        )

    async def _drain(self) -> None:
        """Give started flows the grace to finish (intake has stopped)."""
        if not self.runs:
            return
        log.info(
            "Draining", runner_id=self.runner_id, running=len(self.runs), grace=self.drain_grace
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_grace):
                await self.wait_idle()

    async def _release_all(self) -> None:
        """Hand back what still runs: another runner takes it."""
        if self.runs:
            log.info(
                "Handing back unfinished flows", runner_id=self.runner_id, flows=len(self.runs)
            )
        for run in list(self.runs.values()):
            run.stop(Stop.RELEASED)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELEASE_GRACE):
                await self.wait_idle()
