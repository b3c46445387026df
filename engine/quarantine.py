"""Quarantine: messages no reader can take as events are recorded once and skipped.

A message on the events stream that does not decode, or does not belong where it is
stored (``schemas.stored.decode_stored``), is copied with its subject, sequence, raw
bytes and the reason to the ``TB_QUARANTINE`` stream; the original stays in ``TB``.
Every reader skips it and moves its checkpoint past it; no process stops on it.
Several readers finding one message store one record (the msg-id names the message).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import Header

from engine.publisher import AckedPublisher
from schemas import subjects
from schemas.ids import utcnow
from schemas.quarantine import QuarantinedMessage

log = structlog.get_logger("tb.quarantine")

REMEMBERED = 10_000  # messages a process remembers having recorded (logs once each)
RECORD_TIMEOUT = 5.0

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(QuarantinedMessage).decode


class Quarantine:
    """Records bad messages for one process; ``count`` is how many it found."""

    def __init__(
        self, publisher: AckedPublisher, detected_by: str, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.publisher, self.detected_by, self.clock = publisher, detected_by, clock
        self.count = 0
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    async def record(
        self, *, stream: str, seq: int, subject: str, raw: bytes, reason: str
    ) -> QuarantinedMessage:
        """Store the record (once per message, whoever finds it) and log it once here.

        Never raises for a NATS problem: the reader must move on whatever happens, and
        the original stays in its stream for the next reader to find.
        """
        record = QuarantinedMessage(
            stream=stream,
            seq=seq,
            subject=subject,
            reason=reason,
            raw=raw,
            detected_by=self.detected_by,
            at=self.clock(),
        )
        key = (stream, seq)
        if key in self._seen:
            return record
        self._seen[key] = None
        if len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)
        self.count += 1
        log.error("message.quarantined", stream=stream, seq=seq, subject=subject, reason=reason)
        headers = {
            subjects.MSG_ID_HEADER: subjects.quarantine_msg_id(stream, seq),
            Header.EXPECTED_STREAM.value: subjects.QUARANTINE_STREAM,
        }
        try:
            ack = await self.publisher.publish(
                subjects.quarantine_subject(stream, seq), _encode(record), headers
            )
            async with asyncio.timeout(RECORD_TIMEOUT):
                await ack
        except (nats.errors.Error, TimeoutError) as err:
            self._seen.pop(key, None)  # the next reader to meet it records it
            log.warning("message.quarantine_unrecorded", stream=stream, seq=seq, error=repr(err))
        return record


async def list_quarantined(
    js: JetStreamContext, *, after: int = 0, limit: int = 100
) -> tuple[list[QuarantinedMessage], int]:
    """Records in the order they were stored, from quarantine sequence ``after + 1`` on.

    Returns the records (at most ``limit``) and the cursor to pass as ``after`` for the
    next page (the quarantine stream's sequence of the last record returned).
    """
    try:
        info = await js.stream_info(subjects.QUARANTINE_STREAM)
    except nats.js.errors.NotFoundError:
        return [], after
    last, first = int(info.state.last_seq), int(info.state.first_seq)
    found: list[QuarantinedMessage] = []
    seq = max(after + 1, first)
    cursor = after
    while seq <= last and len(found) < limit:
        try:
            raw = await js.get_msg(subjects.QUARANTINE_STREAM, seq)
        except nats.js.errors.NotFoundError:
            seq += 1
            continue
        cursor = seq
        seq += 1
        try:
            found.append(_decode(raw.data or b""))
        except msgspec.DecodeError:
            continue  # written by something else: not ours to show
    return found, cursor
