"""Work items that ran out of deliveries become ``FlowFailed(exhausted)``.

JetStream keeps a message that hit ``max_deliver`` and only announces it with an
advisory on core NATS; the ``TB_ADVISORIES`` stream captures those, and this
reader turns each into a terminal failure so the job can still finish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.bus import Bus
from schemas import subjects
from schemas.events import FlowDispatched, FlowFailed, decode_event
from schemas.ids import new_id, utcnow

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
    bus: Bus
    clock: Callable[[], datetime] = utcnow
    actor: str = "system"

    async def run(self) -> None:
        config = ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
        )
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await self.bus.js.add_consumer(subjects.ADVISORIES_STREAM, config)
        sub = await self.bus.js.pull_subscribe_bind(CONSUMER, stream=subjects.ADVISORIES_STREAM)
        try:
            while True:
                try:
                    msgs = await sub.fetch(50, timeout=5.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    await self._handle(msg.data)
                    await msg.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _handle(self, data: bytes) -> None:
        try:
            advisory = _decode_advisory(data)
        except msgspec.ValidationError:
            log.warning("advisory.undecodable")
            return
        if advisory.stream != subjects.EVENTS_STREAM:
            return
        try:
            raw = await self.bus.js.get_msg(subjects.EVENTS_STREAM, advisory.stream_seq)
        except nats.js.errors.NotFoundError:
            return  # aged out of the stream: nothing left to account for
        try:
            item = decode_event(raw.data or b"")
        except msgspec.ValidationError:
            return
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
