"""Batched pulls from a JetStream consumer over one subscription."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from engine.publisher import NO_RESPONDERS, STATUS_HEADER

CONTROL = "100"


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a JetStream delivery, read from its ack subject."""
    return _ack_tokens(msg.reply)[0]


def delivery(msg: Msg) -> tuple[int, int]:
    """(stream sequence, how often the consumer has delivered it: 1 the first time)."""
    seq, _, delivered = _ack_tokens(msg.reply)
    return seq, delivered


def _ack_tokens(reply: str) -> tuple[int, int, int]:
    """(stream sequence, pending, delivered) from ``$JS.ACK.<stream>.<consumer>.<delivered>
    .<sseq>.<cseq>.<ts>.<pending>`` or its v2 form with domain and account hash after ``ACK``."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8]), int(tokens[4])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[10]), int(tokens[6])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


class Puller:
    """Batches from one pull consumer over a single callback subscription.

    nats-py's ``fetch`` arms a timer per message and its ``Msg.metadata`` parses every
    reply subject into objects; at thousands of messages a second that is much of a
    process's CPU. Here a batch is one pull request and one future. Each request has its
    own reply subject, so a late status for an earlier request never ends a later one.

    ``read_ahead``: each request also asks for the next batch, which arrives while the
    caller works on this one instead of after a round trip. Only for consumers without
    acks: a work queue must not hold items it has no room for (their ack wait runs).
    What is asked for and still coming counts: a reader slower than the server asks for
    no more than two batches ahead, whatever the server has sent and it has not read.
    """

    def __init__(
        self, nc: Client, stream: str, consumer: str, api_prefix: str, *, read_ahead: bool = False
    ) -> None:
        self.nc, self.consumer = nc, consumer
        self._ahead = 2 if read_ahead else 1  # batches asked for at a time
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._buffer: deque[Msg] = deque()
        self._request = 0
        self._want = 0
        # requests reading ahead, oldest first, and how many messages each has still to
        # bring: the server serves them in order (a delivery names its stored subject,
        # not the request's), and each ends with all it asked for or with a status
        self._coming: OrderedDict[str, int] = OrderedDict()
        self._waiter: asyncio.Future[bool] | None = None
        self._sub: Any = None
        self.pending = -1  # messages left for this consumer after the last one delivered

    async def start(self) -> Puller:
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        waiter = self._waiter
        if not msg.data and msg.headers and STATUS_HEADER in msg.headers:
            status = msg.headers[STATUS_HEADER]
            # 404 no messages, 408 expired, 409 conflicts: the request is over; a
            # heartbeat (100) is not. Statuses of earlier requests are stale, unless
            # the wait is for those read ahead and this one was the last of them.
            if status == CONTROL:
                return
            ahead = self._coming.pop(msg.subject, None) is not None and not self._coming
            if (
                waiter is not None
                and not waiter.done()
                and (msg.subject == f"{self._inbox}.{self._request}" or ahead)
            ):
                waiter.set_result(status != NO_RESPONDERS)
            return
        if self._coming:
            oldest = next(iter(self._coming))
            if self._coming[oldest] > 1:
                self._coming[oldest] -= 1
            else:
                del self._coming[oldest]
        self._buffer.append(msg)
        if waiter is not None and not waiter.done() and len(self._buffer) >= self._want:
            waiter.set_result(True)

    async def _pull(
        self, batch: int, *, expires: float | None, answer_within: float, want: int = 0
    ) -> bool:
        """One pull request (none if ``batch`` is 0: only the wait for those asked for
        before), answered once the last request is over or ``want`` messages (default:
        all asked for) are buffered; False when nothing answered (no consumer, no
        connection)."""
        self._want = want or len(self._buffer) + batch
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        if batch:
            self._request += 1
            request: dict[str, Any] = {"batch": batch}
            if expires is None:
                request["no_wait"] = True
            else:
                request["expires"] = int(expires * 1e9)
            reply = f"{self._inbox}.{self._request}"
            if self._ahead > 1:
                self._coming[reply] = batch
            await self.nc.publish(self._next_subject, msgspec.json.encode(request), reply=reply)
        try:
            # not wait_for: on 3.11 it can swallow a cancel that races the answer, and a
            # reader that ignores its cancel never stops
            async with asyncio.timeout(answer_within):
                return await waiter
        except TimeoutError:
            return bool(self._buffer)
        finally:
            self._waiter = None

    async def fetch(self, batch: int, linger: float) -> list[Msg]:
        """Up to ``batch`` messages: what is there at once, else the first to arrive
        within ``linger`` seconds (``[]`` if none did). Raises ``nats.errors.TimeoutError``
        when the server did not answer at all."""
        if len(self._buffer) < batch:
            # a reader ahead asks again once a batch is free, not for each fetch: what it
            # asked for before may still be on its way
            need = self._ahead * batch - len(self._buffer) - self._still_coming()
            need = max(need, batch - len(self._buffer)) if need >= batch or not self._coming else 0
            answered = await self._pull(need, expires=None, answer_within=linger, want=batch)
            if not self._buffer:
                if not answered:
                    raise nats.errors.TimeoutError
                # nothing stored yet: linger for the first message only (a batch could
                # wait until it is full), then take what came with it at once
                expires = max(linger - 0.05, 0.01)
                answered = await self._pull(1, expires=expires, answer_within=linger + 1.0)
                if not answered:
                    raise nats.errors.TimeoutError
                if self._buffer and batch > len(self._buffer):
                    need = batch - len(self._buffer)
                    await self._pull(need, expires=None, answer_within=linger)
        n = min(batch, len(self._buffer))
        msgs = [self._buffer.popleft() for _ in range(n)]
        if msgs:
            self.pending = _ack_tokens(msgs[-1].reply)[1]
        return msgs

    def _still_coming(self) -> int:
        """Messages asked for by requests the server has not ended (counted when reading
        ahead only: a work queue's puller asks for what it has room for, as before)."""
        return sum(self._coming.values())
