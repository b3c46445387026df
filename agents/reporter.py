"""Flow reporting: executor callbacks become flow events with deterministic msg-ids.

A redelivered work item runs again and reports again under the same msg-ids
(``<flow_id>:<attempt>:<type>:<n>``), so JetStream stores each event once within
its duplicate window; the read side counts flows, not events, beyond it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

import nats.errors
from nats.aio.msg import Msg

from agents.backoff import Backoff
from agents.executor import FlowResult
from agents.human import PageTrail
from engine.bus import Appended, Bus
from schemas import subjects
from schemas.events import (
    CONSENT_REVOKED,
    TRAIL_LENGTH,
    ClickDone,
    ClickSkipped,
    EgressRefused,
    FlowDispatched,
    FlowDone,
    FlowEvent,
    FlowFailed,
    FlowReleased,
    FlowStarted,
    LinkPick,
    PageLeft,
    PageTimings,
    PageVisited,
    ProxyFailed,
)
from schemas.ids import new_id, utcnow

E = TypeVar("E", bound=FlowEvent)
KEEPALIVE_EVERY = 1.0  # seconds between two in-progress acks of one work item
REPORT_PATIENCE = 30.0  # seconds a flow's outcome is re-sent before its item is left unacked


class FlowReporter:
    """One delivery of one work item: its events, its keepalives, its ack."""

    __slots__ = (
        "_counts",
        "_last_keepalive",
        "_unacked",
        "bus",
        "delivery",
        "item",
        "msg",
        "runner_id",
    )

    def __init__(
        self, bus: Bus, item: FlowDispatched, runner_id: str, msg: Msg, delivery: int
    ) -> None:
        self.bus, self.item, self.runner_id, self.msg = bus, item, runner_id, msg
        self.delivery = delivery  # JetStream's delivery count: a redelivery keeps the attempt
        self._counts: dict[str, int] = {}
        self._last_keepalive = time.monotonic()
        self._unacked: list[tuple[asyncio.Future[Appended], FlowEvent, str]] = []

    def _event(self, cls: type[E], **fields: Any) -> E:
        return cls(
            id=new_id(),
            at=utcnow(),
            actor=self.runner_id,
            job_id=self.item.job_id,
            flow_id=self.item.flow_id,
            attempt=self.item.attempt,
            delivery=self.delivery,
            **fields,
        )

    async def publish(self, event: FlowEvent, msg_id: str | None = None) -> None:
        """Send the event; its ack is awaited in ``stored`` (one connection keeps order)."""
        if msg_id is None:
            kind = type(event).__name__
            n = self._counts.get(kind, 0)
            self._counts[kind] = n + 1
            msg_id = subjects.flow_msg_id(event, n)
        self._unacked.append((await self.bus.append_nowait(event, msg_id=msg_id), event, msg_id))

    async def stored(self, retry: Backoff, patience: float = REPORT_PATIENCE) -> None:
        """Wait until JetStream has acked every event published so far.

        A publish NATS did not take is sent again (same msg-id: stored once) with
        ``retry``'s back-off for up to ``patience`` seconds; then its error is raised.
        """
        deadline = time.monotonic() + patience
        pending, self._unacked = self._unacked, []
        while pending:
            failed: list[tuple[FlowEvent, str]] = []
            error: BaseException | None = None
            for future, event, msg_id in pending:  # in order, as they were sent
                try:
                    await future
                except nats.errors.Error as err:
                    failed.append((event, msg_id))
                    error = error or err
            if error is None:
                if retry.failures:
                    retry.succeeded()
                return
            if time.monotonic() >= deadline:
                raise error
            await asyncio.sleep(retry.failed(error))
            await self.in_progress()
            pending = []
            for event, msg_id in failed:
                try:
                    future = await self.bus.append_nowait(event, msg_id=msg_id)
                except nats.errors.Error as err:
                    future = asyncio.get_running_loop().create_future()
                    future.set_exception(err)
                pending.append((future, event, msg_id))

    def _next(self, kind: type[FlowEvent]) -> int:
        return self._counts.get(kind.__name__, 0)

    # -- the executor's callbacks (agents.executor.FlowReport) --------------------------

    async def page_visited(
        self, url: str, status: int | None, timings: PageTimings | None = None
    ) -> None:
        n = self._next(PageVisited)
        event = self._event(PageVisited, url=url, status=status, n=n, timings=timings)
        await self.publish(event)

    async def page_left(self, url: str, trail: PageTrail, timings: PageTimings | None) -> None:
        n = self._next(PageLeft)
        event = self._event(
            PageLeft,
            url=url,
            n=n,
            dwell_ms=trail.dwell_ms,
            scrolls=trail.scrolls[:TRAIL_LENGTH],
            pauses_ms=trail.pauses_ms[:TRAIL_LENGTH],
            moves=trail.moves[:TRAIL_LENGTH],
            timings=timings,
        )
        await self.publish(event)

    async def click_done(self, href: str, link: LinkPick | None = None) -> None:
        n = self._next(ClickDone)
        index = self.item.target_index
        event = self._event(ClickDone, target_index=index, href=href, n=n, link=link)
        await self.publish(event)

    async def click_skipped(self, href: str, reason: str) -> None:
        n = self._next(ClickSkipped)
        await self.publish(self._event(ClickSkipped, href=href, reason=reason, n=n))

    async def egress_refused(self, host: str, port: int, reason: str, request: str) -> None:
        n = self._next(EgressRefused)
        event = self._event(
            EgressRefused, host=host, port=port, reason=reason, request=request, n=n
        )
        await self.publish(event)

    async def proxy_failed(self, proxy_id: str, proxy: str, error: str, reason: str) -> None:
        n = self._next(ProxyFailed)
        event = self._event(
            ProxyFailed,
            proxy=proxy,
            reason=reason[:1000],
            n=n,
            proxy_id=proxy_id,
            error=error[:32],
        )
        await self.publish(event)

    async def keepalive(self) -> None:
        now = time.monotonic()
        if now - self._last_keepalive >= KEEPALIVE_EVERY:
            self._last_keepalive = now
            await self.in_progress()

    async def in_progress(self) -> None:
        """Keep the work item's ack wait from running out (best effort: a lost one is
        made good by the next, or the item is redelivered)."""
        with contextlib.suppress(nats.errors.Error):
            await self.msg.in_progress()

    # -- outcomes ------------------------------------------------------------------------

    async def started(self) -> None:
        await self.publish(self._event(FlowStarted, runner_id=self.runner_id))

    async def done(self, result: FlowResult, duration_ms: int) -> None:
        event = self._event(
            FlowDone,
            runner_id=self.runner_id,
            target_index=self.item.target_index,
            clicks_done=result.clicks_done,
            duration_ms=duration_ms,
            device=result.device,
            delay_ms=result.delay_ms,
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

    async def revoked(self, reason: str = CONSENT_REVOKED) -> None:
        """The flow ends for good: its host's consent is gone. The dispatcher writes the
        same msg-id when it sees the revocation first; whoever is first is stored."""
        event = self._event(
            FlowFailed,
            runner_id=self.runner_id,
            target_index=self.item.target_index,
            reason=reason,
            retryable=False,
        )
        item = self.item
        await self.publish(event, subjects.revoked_msg_id(item.flow_id, item.attempt))

    async def released(self, reason: str) -> None:
        """The work item goes back to the dispatcher unrun, no attempt spent."""
        event = self._event(
            FlowReleased,
            runner_id=self.runner_id,
            target_index=self.item.target_index,
            reason=reason,
        )
        item = self.item
        msg_id = subjects.released_msg_id(item.flow_id, item.attempt, self.delivery)
        await self.publish(event, msg_id)
