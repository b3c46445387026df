"""A runner's lines in its jobs' logs: a flow received, done or failed.

Best effort and off the flow's path: a line is queued (bounded) and one task sends
the queue to ``tb.log.<job_id>`` without waiting for acks. A line NATS does not take,
or one the full queue pushes out, is lost and counted; a flow never waits for, nor
fails because of, its log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import nats.errors
import structlog

from engine.bus import Bus
from engine.cancellation import stop_task
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.ids import utcnow
from schemas.logs import LogLevel, LogLine

log = structlog.get_logger("tb.agent")

QUEUED_LINES = 10_000  # lines waiting to be sent at most; beyond, the oldest are dropped
CLOSE_GRACE = 2.0  # seconds a stopping runner gives its queued lines to go out


class JobLog:
    """``enabled=False`` writes nothing (``TB_RUNNER_JOB_LOGS=false``)."""

    def __init__(
        self, bus: Bus, runner_id: str, *, enabled: bool = True, queued: int = QUEUED_LINES
    ) -> None:
        self.bus, self.runner_id, self.enabled = bus, runner_id, enabled
        self._queue: deque[tuple[LogLine, str]] = deque(maxlen=queued)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.lost = 0  # not taken by NATS, or pushed out of a full queue

    def received(self, item: FlowDispatched, delivery: int) -> None:
        if not self.enabled:
            return
        text = f"[INFO] Flow received: {item.flow_id} attempt {item.attempt} {item.url}"
        self._line(item, delivery, "received", "INFO", text)

    def finished(
        self, item: FlowDispatched, delivery: int, outcome: str, seconds: float, detail: str
    ) -> None:
        """``outcome``: the run's (done, failed, revoked, released, dropped, unreported)."""
        if not self.enabled:
            return
        if outcome == "done":
            level: LogLevel = "SUCCESS"
            text = f"[SUCCESS] Flow done: {item.flow_id} in {seconds:.1f}s"
        elif outcome in ("failed", "revoked", "unreported"):
            level = "ERROR"
            text = f"[ERROR] Flow {outcome}: {item.flow_id} after {seconds:.1f}s"
        else:
            level = "INFO"
            text = f"[INFO] Flow {outcome}: {item.flow_id}"
        if detail:
            text = f"{text}: {detail}"
        self._line(item, delivery, outcome, level, text)

    def _line(
        self, item: FlowDispatched, delivery: int, what: str, level: LogLevel, text: str
    ) -> None:
        line = LogLine(
            job_id=item.job_id, level=level, message=text, at=utcnow(), source=self.runner_id
        )
        if len(self._queue) == self._queue.maxlen:
            self.lost += 1
        self._queue.append(
            (line, subjects.runner_log_msg_id(item.flow_id, item.attempt, delivery, what))
        )
        if self._task is None:
            self._task = asyncio.create_task(self._send(), name="runner-job-log")
        self._wake.set()

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_queued()

    async def _send_queued(self) -> None:
        queue = self._queue
        while queue:
            line, msg_id = queue.popleft()
            try:
                await self.bus.log_nowait(line, msg_id)
                self.sent += 1
            except nats.errors.Error:
                self.lost += 1

    async def close(self) -> None:
        """Send what is queued (for ``CLOSE_GRACE`` seconds at most), then stop."""
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            async with asyncio.timeout(CLOSE_GRACE):
                await self._send_queued()
                await self.bus.nc.flush()
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
        if self.lost:
            log.warning("job_log.lines_lost", runner_id=self.runner_id, lost=self.lost)
