"""Work items that ran out of deliveries become ``FlowFailed(exhausted)``.

JetStream keeps a message that hit ``max_deliver`` and only announces it with an
advisory on core NATS; the ``TB_ADVISORIES`` stream captures those, and this
reader turns each into a terminal failure so the job can still finish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.bus import Bus
from engine.transient import Backoff, is_transient, until_done
from schemas import subjects
from schemas.events import FlowDispatched, FlowFailed
from schemas.ids import new_id, utcnow
from schemas.stored import Undecodable, decode_stored

log = structlog.get_logger("tb.engine")

CONSUMER = "exhausted_flows"


class MaxDeliveriesAdvisory(msgspec.Struct):
    """``io.nats.jetstream.advisory.v1.max_deliver`` (only the fields we use)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_decode_advisory = msgspec.json.Decoder(MaxDeliveriesAdvisory).decode


def exhausted(item: FlowDispatched, deliveries: int, at: datetime, actor: str) -> FlowFailed:
    return FlowFailed(
        id=new_id(),
        at=at,
        actor=actor,
        job_id=item.job_id,
        flow_id=item.flow_id,
        attempt=item.attempt,
        target_index=item.target_index,
        reason=f"exhausted: delivered {deliveries} times without an outcome",
        retryable=False,
    )


@dataclass
class ExhaustedDeliveries:
    """Turns captured max-delivery advisories into terminal failures; waits out NATS trouble."""

    bus: Bus
    clock: Callable[[], datetime] = utcnow
    actor: str = "system"
    backoff: Backoff = field(default_factory=lambda: Backoff("exhausted-deliveries"))

    async def run(self) -> None:
        while True:
            try:
                await self._consume()
            except Exception as err:
                if not is_transient(err, self.bus.nc):
                    raise
                await self.backoff.failed(err)

    async def _consume(self) -> None:
        config = ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
        )
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await self.bus.js.add_consumer(subjects.ADVISORIES_STREAM, config)
        sub = await self.bus.js.pull_subscribe_bind(CONSUMER, stream=subjects.ADVISORIES_STREAM)
        self.backoff.succeeded()
        try:
            while True:
                try:
                    msgs = await sub.fetch(50, timeout=5.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue  # nothing exhausted lately
                for msg in msgs:
                    await self._handle_until_done(msg.data)
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _handle_until_done(self, data: bytes) -> None:
        """Handle one advisory, waiting out NATS trouble in place: unacked, it would
        otherwise come back only after the consumer's ack wait."""
        await until_done(lambda: self._handle(data), self.backoff, self.bus.nc)

    async def _handle(self, data: bytes) -> None:
        try:
            advisory = _decode_advisory(data)
        except msgspec.DecodeError:  # ValidationError included
            log.warning("advisory.undecodable")
            return
        if advisory.stream != subjects.EVENTS_STREAM:
            return
        try:
            raw = await self.bus.js.get_msg(subjects.EVENTS_STREAM, advisory.stream_seq)
        except nats.js.errors.NotFoundError:
            return  # aged out of the stream: nothing left to account for
        try:
            item = decode_stored(raw.subject or "", raw.data or b"", raw.headers)
        except Undecodable:
            return  # quarantined by the readers that meet it; no work item to end
        if not isinstance(item, FlowDispatched):
            return
        failed = exhausted(item, advisory.deliveries, self.clock(), self.actor)
        await self.bus.append(failed, msg_id=subjects.exhausted_msg_id(item.flow_id, item.attempt))
        log.warning(
            "flow.exhausted",
            job_id=item.job_id,
            flow_id=item.flow_id,
            attempt=item.attempt,
            deliveries=advisory.deliveries,
        )
