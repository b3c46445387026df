"""Batched pulls from a JetStream consumer over one subscription."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
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
            # heartbeat (100) is not. Statuses of earlier requests are stale.
            if (
                status != CONTROL
                and waiter is not None
                and not waiter.done()
                and msg.subject == f"{self._inbox}.{self._request}"
            ):
                waiter.set_result(status != NO_RESPONDERS)
            return
        self._buffer.append(msg)
        if waiter is not None and not waiter.done() and len(self._buffer) >= self._want:
            waiter.set_result(True)

    async def _pull(
        self, batch: int, *, expires: float | None, answer_within: float, want: int = 0
    ) -> bool:
        """One pull request, answered once it is over or ``want`` messages (default: all
        asked for) are buffered; False when nothing answered (no consumer, no connection)."""
        self._request += 1
        self._want = want or len(self._buffer) + batch
        request: dict[str, Any] = {"batch": batch}
        if expires is None:
            request["no_wait"] = True
        else:
            request["expires"] = int(expires * 1e9)
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        await self.nc.publish(
            self._next_subject,
            msgspec.json.encode(request),
            reply=f"{self._inbox}.{self._request}",
        )
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
            need = self._ahead * batch - len(self._buffer)
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
