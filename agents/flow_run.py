"""One delivery of one work item, from its slot to its ack.

The item is admitted first (is its job still running? see ``agents.control``), then
run by the executor, reported, and acked only once every event it reported is
stored: a crash, or a publish that failed, before the ack redelivers the item.
A run can be stopped from outside (its job ended, the runner drains); the
executor's task is cancelled, which closes the flow's browser context. A failed
run's screenshot is stored in the screenshots bucket before its FlowFailed, which
names it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, TypeVar

import nats.errors

from agents.backoff import Backoff
from agents.control import Admission, Control, Verdict, target_host
from agents.executor import AllowedHosts, FlowError, FlowExecutor
from agents.intake import Work
from agents.reporter import FlowReporter
from agents.screenshots import store_screenshot
from schemas.events import CONSENT_REVOKED

T = TypeVar("T")


class Stop(Enum):
    """Why a run was stopped from outside, and so what becomes of its work item."""

    ENDED = "job ended"  # acked, nothing reported: the dispatcher already let the flow go
    REVOKED = "consent revoked"  # its target host's consent is gone: FlowFailed, not retried
    # the runner drains: nak'd without delay (a drain is no failure), so another runner
    # takes it at once; the delivery count goes up, the attempt stays
    RELEASED = "released"


class Outcome(Enum):
    DONE = "done"
    FAILED = "failed"
    DROPPED = "dropped"  # its job was over
    REVOKED = "revoked"  # failed for good: no valid consent for its target host
    RELEASED = "released"  # handed back (job paused, runner draining)
    UNREPORTED = "unreported"  # NATS did not take its outcome: left unacked, redelivered


class FlowRun:
    # hundreds live at once on a busy runner: no per-instance dict
    __slots__ = (
        "_interruptible",
        "_revoked_early",
        "_started",
        "_task",
        "control",
        "detail",
        "executor",
        "hosts",
        "item",
        "nats_trouble",
        "report",
        "stopped",
        "target",
        "work",
    )

    def __init__(
        self,
        work: Work,
        reporter: FlowReporter,
        executor: FlowExecutor,
        control: Control,
        nats_trouble: Backoff,
    ) -> None:
        self.work, self.item, self.report = work, work.item, reporter
        self.executor, self.control = executor, control
        self.nats_trouble = nats_trouble  # shared by a runner's flows: one line per episode
        self.target = target_host(self.item.url)
        # where the browser may go, once admitted; revocations shrink it while it runs
        self.hosts: AllowedHosts | None = None
        self._revoked_early: set[str] = set()  # revoked before the run had its hosts
        self.stopped: Stop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._interruptible = False  # whether ``stop`` may cancel the task now
        self._started = False  # reported started: a drain lets it finish
        self.detail = ""  # why it ended as it did (a failure's reason, a drop's cause)

    def stop(self, why: Stop) -> None:
        """End the run early; the first reason given counts. A running executor is
        cancelled (closing its browser context), a wait for admission too; reports and
        acks already under way are not interrupted."""
        if self.stopped is None:
            self.stopped = why
        if self._interruptible and self._task is not None:
            self._task.cancel()

    def release_unless_started(self) -> None:
        """A draining runner hands back what has not started yet; started flows finish."""
        if not self._started:
            self.stop(Stop.RELEASED)

    def revoke(self, host: str) -> None:
        """A host's consent was revoked: a flow on it ends; one that merely may visit it
        goes on without it."""
        if host == self.target:
            self.stop(Stop.REVOKED)
        elif self.hosts is not None:
            self.hosts.revoke(host)
        else:
            self._revoked_early.add(host)

    async def run(self) -> Outcome:
        # one coroutine on the hot path (admitted, run, reported, acked): every frame
        # and call more is paid by every flow
        if self._task is None:
            self._task = asyncio.current_task()
        try:
            admission = self.control.admit_now(self.item)
            if admission is None:  # a job not seen yet, or word from the stream is stale
                admission = await self._unless_stopped(
                    lambda: self._keeping_alive(self.control.admit(self.item))
                )
            if admission is None or self.stopped is not None:
                return await self._stopped(self.stopped or Stop.RELEASED)
            if admission.verdict is not Verdict.RUN:
                return await self._not_run(admission)
            # the hosts with valid consent now, less any revoked since
            self.hosts = AllowedHosts(admission.hosts - self._revoked_early, normal=True)
            hosts = self.hosts

            began = time.monotonic()
            self._started = True
            await self.report.started()
            if self.stopped is not None:
                return await self._stopped(self.stopped)
            self._interruptible = True  # from here on, ``stop`` cancels this task
            try:
                result = await self.executor.run(self.item, self.report, hosts)
            except FlowError as err:
                self._interruptible = False
                if self.stopped is not None:  # most likely the stop's doing (browser closed)
                    return await self._stopped(self.stopped)
                shot = None
                if err.screenshot is not None:
                    shot = await self._keeping_alive(
                        store_screenshot(self.report.bus, self.work, err.screenshot)
                    )
                await self.report.failed(err.reason, err.retryable, shot)
                self.detail = err.reason if err.retryable else f"{err.reason} (not retried)"
                outcome = Outcome.FAILED
            except asyncio.CancelledError:
                self._interruptible = False
                if self.stopped is None:
                    raise  # the runner itself is being cancelled
                self._task.uncancel()  # the cancel was ``stop``'s: settle the work item
                return await self._stopped(self.stopped)
            else:
                # a stop that comes after the result does not undo it
                self._interruptible = False
                await self.report.done(result, int((time.monotonic() - began) * 1000))
                outcome = Outcome.DONE
            await self.report.stored(self.nats_trouble)
            await self.work.msg.ack()
            if self.nats_trouble.failures:
                self.nats_trouble.succeeded()
            return outcome
        except nats.errors.Error as err:
            # not acked: JetStream redelivers the work item after the ack wait
            self.nats_trouble.failed(err)
            return Outcome.UNREPORTED

    async def _not_run(self, admission: Admission) -> Outcome:
        self.detail = admission.reason
        if admission.verdict is Verdict.DROP:
            await self._ack()
            return Outcome.DROPPED
        if admission.verdict is Verdict.RELEASE:
            await self.report.released(admission.reason)
            await self._stored()
            await self._ack()
            return Outcome.RELEASED
        return await self._revoked(admission.reason)

    async def _unless_stopped(self, step: Callable[[], Awaitable[T]]) -> T | None:
        """``step()``'s result; ``None`` when the run was stopped before or during it
        (``stop`` cancels this task while it waits)."""
        if self.stopped is not None:
            return None
        self._interruptible = True
        try:
            return await step()
        except asyncio.CancelledError:
            if self.stopped is None:
                raise  # the runner itself is being cancelled
            # the cancel was ``stop``'s: the run goes on to settle its work item
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
            return None
        finally:
            self._interruptible = False

    async def _revoked(self, reason: str = CONSENT_REVOKED) -> Outcome:
        self.detail = f"{reason} ({self.target})"
        await self.report.revoked(reason)
        await self._stored()
        await self._ack()
        return Outcome.REVOKED

    async def _stopped(self, why: Stop) -> Outcome:
        if why is Stop.RELEASED:
            self.detail = "runner draining"
            return await self._nak()
        if why is Stop.REVOKED:
            return await self._revoked()
        self.detail = why.value
        await self._ack()  # the job is over: nobody should run this flow again
        return Outcome.DROPPED

    async def _stored(self) -> None:
        await self.report.stored(self.nats_trouble)

    async def _ack(self) -> None:
        await self.work.msg.ack()
        self.nats_trouble.succeeded()

    async def _nak(self) -> Outcome:
        await self.work.msg.nak()
        self.nats_trouble.succeeded()
        return Outcome.RELEASED

    async def _keeping_alive(self, waiting: Awaitable[T]) -> T:
        """Await something slow while the work item's ack wait is kept from running out."""
        task = asyncio.ensure_future(waiting)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=1.0)
                if done:
                    return task.result()
                await self.report.in_progress()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
