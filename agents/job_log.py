"""A runner's lines in its jobs' logs: a flow received, done or failed.

Best effort and off the flow's path: a line is queued (bounded) and one task sends
the queue to ``tb.log.<job_id>`` without waiting for acks. A line NATS does not take,
or one the full queue pushes out, is lost and counted; a flow never waits for, nor
fails because of, its log.

The lines gathered within ``WINDOW`` go out as one message per job (up to
``BATCH_BYTES``): two messages a flow cost the server as much as the flow's events.
A message's id is made of its lines' keys, so the same lines sent twice are stored
once. A redelivered work item is another delivery, whose lines are new lines: its
log says so twice, as it happened.
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
from schemas.logs import LogLevel, LogLine, encode_log_line

log = structlog.get_logger("tb.agent")

QUEUED_LINES = 10_000  # lines waiting to be sent at most; beyond, the oldest are dropped
CLOSE_GRACE = 2.0  # seconds a stopping runner gives its queued lines to go out
WINDOW = 0.05  # seconds lines are gathered before they go out: a line shows that much later
BATCH_BYTES = 128 * 1024  # encoded lines in one message at most (a line alone may be more)


class JobLog:
    """``enabled=False`` writes nothing (``TB_RUNNER_JOB_LOGS=false``)."""

    def __init__(
        self,
        bus: Bus,
        runner_id: str,
        *,
        enabled: bool = True,
        queued: int = QUEUED_LINES,
        window: float = WINDOW,
    ) -> None:
        self.bus, self.runner_id, self.enabled = bus, runner_id, enabled
        self.window = window
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
            (line, subjects.runner_log_key(item.flow_id, item.attempt, delivery, what))
        )
        if self._task is None:
            self._task = asyncio.create_task(self._send(), name="runner-job-log")
        self._wake.set()

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.window)
            self._wake.clear()
            await self._send_queued()

    async def _send_queued(self) -> None:
        queue = self._queue
        by_job: dict[str, list[tuple[LogLine, str]]] = {}
        while queue:
            line, key = queue.popleft()
            by_job.setdefault(line.job_id, []).append((line, key))
        for job_id, lines in by_job.items():
            encoded: list[bytes] = []
            keys: list[str] = []
            size = 0
            for line, key in lines:
                data = encode_log_line(line)
                if encoded and size + len(data) > BATCH_BYTES:
                    await self._publish(job_id, encoded, keys)
                    encoded, keys, size = [], [], 0
                encoded.append(data)
                keys.append(key)
                size += len(data) + 1
            await self._publish(job_id, encoded, keys)

    async def _publish(self, job_id: str, encoded: list[bytes], keys: list[str]) -> None:
        try:
            await self.bus.log_nowait(job_id, encoded, subjects.runner_log_msg_id(job_id, keys))
            self.sent += len(encoded)
        except nats.errors.Error:
            self.lost += len(encoded)

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
