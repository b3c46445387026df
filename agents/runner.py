"""The runner agent: register, pull work for its platform, run flows, report events.

Delivery is at-least-once: a flow whose runner dies is redelivered after the ack
wait and may report twice; the msg-ids make a replayed publish a no-op, and the
read side counts flows, not events.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from agents.executor import FlowError, FlowExecutor, FlowResult
from engine.bus import Appended, Bus
from schemas import VERSION, subjects
from schemas.events import (
    ClickDone,
    ClickSkipped,
    FlowDispatched,
    FlowDone,
    FlowEvent,
    FlowFailed,
    FlowStarted,
    PageVisited,
    RunnerDeregistered,
    RunnerDraining,
    RunnerEvent,
    RunnerRegistered,
    decode_event,
)
from schemas.ids import new_id, short_id, utcnow
from schemas.presence import RunnerPresence
from schemas.values import Platform

log = structlog.get_logger("tb.agent")
E = TypeVar("E", bound=FlowEvent)


class FlowReporter:
    """Turns executor callbacks into flow events with deterministic msg-ids."""

    def __init__(self, bus: Bus, item: FlowDispatched, runner_id: str, msg: Msg) -> None:
        self.bus, self.item, self.runner_id, self.msg = bus, item, runner_id, msg
        self._counts: dict[str, int] = {}
        self._last_keepalive = time.monotonic()
        self._unacked: list[asyncio.Future[Appended]] = []

    def _event(self, cls: type[E], **fields: Any) -> E:
        return cls(
            id=new_id(),
            at=utcnow(),
            actor=self.runner_id,
            job_id=self.item.job_id,
            flow_id=self.item.flow_id,
            attempt=self.item.attempt,
            **fields,
        )

    async def publish(self, event: FlowEvent) -> None:
        """Send the event; its ack is awaited in ``stored`` (one connection keeps order)."""
        kind = type(event).__name__
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        self._unacked.append(
            await self.bus.append_nowait(event, msg_id=subjects.flow_msg_id(event, n))
        )

    async def stored(self) -> None:
        """Wait until JetStream has acked every event published so far (raises if one failed)."""
        unacked, self._unacked = self._unacked, []
        for ack in unacked:
            await ack

    def _next(self, kind: type[FlowEvent]) -> int:
        return self._counts.get(kind.__name__, 0)

    async def page_visited(self, url: str, status: int | None) -> None:
        n = self._next(PageVisited)
        await self.publish(self._event(PageVisited, url=url, status=status, n=n))

    async def click_done(self, href: str) -> None:
        n = self._next(ClickDone)
        index = self.item.target_index
        await self.publish(self._event(ClickDone, target_index=index, href=href, n=n))

    async def click_skipped(self, href: str, reason: str) -> None:
        n = self._next(ClickSkipped)
        await self.publish(self._event(ClickSkipped, href=href, reason=reason, n=n))

    async def keepalive(self) -> None:
        now = time.monotonic()
        if now - self._last_keepalive >= 1.0:
            self._last_keepalive = now
            with contextlib.suppress(Exception):
                await self.msg.in_progress()

    async def started(self) -> None:
        await self.publish(self._event(FlowStarted, runner_id=self.runner_id))

    async def done(self, result: FlowResult, duration_ms: int) -> None:
        event = self._event(
            FlowDone,
            runner_id=self.runner_id,
            target_index=self.item.target_index,
            clicks_done=result.clicks_done,
            duration_ms=duration_ms,
        )
        await self.publish(event)

    async def failed(self, reason: str, retryable: bool, screenshot: str | None) -> None:
        event = self._event(
            FlowFailed,
            runner_id=self.runner_id,
            target_index=self.item.target_index,
            reason=reason,
            retryable=retryable,
            screenshot=screenshot,
        )
        await self.publish(event)


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
    heartbeat_interval: float = 5.0
    drain_grace: float = 30.0
    announce: Callable[[str], None] = lambda line: None
    _flows: dict[str, tuple[str, asyncio.Task[None]]] = field(default_factory=dict)
    _cancelled_jobs: set[str] = field(default_factory=set)
    _seen_jobs: set[str] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    _completed: int = 0
    _failed: int = 0

    async def wait_idle(self) -> None:
        """Return once no flow is running (cancelled, finished or released)."""
        while self._flows:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    def stop(self) -> None:
        """Stop intake; running flows finish (or are released after the grace period)."""
        self._stopping.set()
        self._slot_freed.set()

    async def run(self) -> None:
        await self.executor.start()
        durable = await self._work_queue()
        await self._emit(
            RunnerRegistered(
                id=new_id(),
                at=utcnow(),
                actor=self.runner_id,
                runner_id=self.runner_id,
                platform=self.platform,
                slots=self.slots,
                hostname=socket.gethostname(),
                version=VERSION,
            )
        )
        await self._heartbeat()
        self.announce(f"✅ Registered as runner: {self.runner_id}")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="runner-heartbeat")
        cancels = await self.bus.nc.subscribe(
            subjects.job_subject("*", "JobCancelled"), cb=self._on_cancel
        )
        try:
            await self._consume(durable)
            await self._drain()
        finally:
            heartbeat.cancel()
            with contextlib.suppress(Exception):
                await cancels.unsubscribe()
            await self._deregister()
            await self.executor.close()

    async def _work_queue(self) -> str:
        """The platform's consumer; the engine provisions the streams, so wait for them."""
        told = False
        while True:
            try:
                return await self.bus.ensure_dispatch_consumer(
                    self.platform.os, self.platform.browser
                )
            except nats.js.errors.NotFoundError:
                if not told:
                    self.announce("[INFO] Waiting for the engine to provision the event streams")
                    told = True
                await asyncio.sleep(1.0)

    async def _consume(self, durable: str) -> None:
        puller = await self.bus.puller(durable)
        try:
            while not self._stopping.is_set():
                free = self.slots - len(self._flows)
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                try:
                    msgs = await puller.fetch(min(free, self.fetch_batch), linger=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await self._start_flow(msg)
        finally:
            await puller.close()

    async def _start_flow(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except msgspec.ValidationError:
            event = None
        if not isinstance(event, FlowDispatched):
            log.error("runner.bad_work_item", subject=msg.subject)
            await msg.term()  # never redeliver what no runner can run
            return
        if event.job_id not in self._seen_jobs:
            self._seen_jobs.add(event.job_id)
            self.announce(f"📥 Received new job: {event.job_id}")
            self.announce(f"Starting job {event.job_id}")
        flow_id = event.flow_id
        task = asyncio.create_task(self._run_flow(event, msg))
        self._flows[flow_id] = (event.job_id, task)

        def finished(task: asyncio.Task[None]) -> None:
            self._flows.pop(flow_id, None)
            self._slot_freed.set()
            if not task.cancelled() and (err := task.exception()) is not None:
                # not acked: JetStream redelivers the work item after the ack wait
                log.error("flow.unreported", flow_id=flow_id, error=repr(err))

        task.add_done_callback(finished)

    async def _run_flow(self, item: FlowDispatched, msg: Msg) -> None:
        if item.job_id in self._cancelled_jobs:
            await msg.ack()
            return
        report = FlowReporter(self.bus, item, self.runner_id, msg)
        started = time.monotonic()
        try:
            await report.started()
            result = await self.executor.run(item, report)
        except FlowError as err:
            await report.failed(err.reason, err.retryable, getattr(err, "screenshot", None))
            self._failed += 1
            log.info(
                "flow.failed",
                job_id=item.job_id,
                flow_id=item.flow_id,
                attempt=item.attempt,
                reason=err.reason,
                retryable=err.retryable,
            )
        except asyncio.CancelledError:
            if item.job_id in self._cancelled_jobs:
                await msg.ack()  # the job is over: nobody should run this flow again
            else:
                await msg.nak(delay=1.0)  # released while draining: another runner takes it
            raise
        else:
            await report.done(result, int((time.monotonic() - started) * 1000))
            self._completed += 1
        # acked only after the outcome (and every event before it) is stored: a crash
        # or a failed publish before this line redelivers the work item
        await report.stored()
        await msg.ack()

    async def _on_cancel(self, msg: Msg) -> None:
        job_id = msg.subject.split(".")[2]
        self._cancelled_jobs.add(job_id)
        for flow_job, task in list(self._flows.values()):
            if flow_job == job_id:
                task.cancel()

    async def _drain(self) -> None:
        if not self._flows:
            return
        await self._emit(
            RunnerDraining(id=new_id(), at=utcnow(), actor=self.runner_id, runner_id=self.runner_id)
        )
        tasks = [task for _, task in self._flows.values()]
        _, pending = await asyncio.wait(tasks, timeout=self.drain_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _deregister(self) -> None:
        with contextlib.suppress(Exception):
            await self._emit(
                RunnerDeregistered(
                    id=new_id(),
                    at=utcnow(),
                    actor=self.runner_id,
                    runner_id=self.runner_id,
                    reason="stopped",
                )
            )
            kv = await self.bus.kv(subjects.RUNNERS_BUCKET)
            await kv.delete(self.runner_id)

    async def _emit(self, event: RunnerEvent) -> None:
        await self.bus.append(event, msg_id=subjects.runner_msg_id(event))

    async def _heartbeat(self) -> None:
        kv = await self.bus.kv(subjects.RUNNERS_BUCKET)
        presence = RunnerPresence(
            runner_id=self.runner_id,
            os=self.platform.os,
            browser=self.platform.browser,
            slots=self.slots,
            running=len(self._flows),
            completed=self._completed,
            failed=self._failed,
            status="draining" if self._stopping.is_set() else "online",
            hostname=socket.gethostname(),
            version=VERSION,
            last_heartbeat=utcnow().isoformat(),
        )
        await kv.put(self.runner_id, msgspec.json.encode(presence))

    async def _heartbeat_loop(self) -> None:
        # presence expires after the bucket's TTL: beat at least three times within it
        interval = min(self.heartbeat_interval, self.bus.config.presence_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat()
            except Exception as err:  # presence must outlive a NATS blip; the next beat retries
                log.warning("runner.heartbeat_failed", error=str(err))
