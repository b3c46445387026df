"""JetStream publishes whose acks come back on one inbox and resolve futures.

Leaner than nats-py's ``publish_async`` (no semaphore, no per-publish token from
``os.urandom``, acks decoded by msgspec instead of ``PubAck.from_response``), with
the same errors: an ``APIError`` subclass from the ack, no responders, or
``nats.errors.TimeoutError`` after ``PUBLISH_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

PUBLISH_TIMEOUT = 10.0  # an ack not back by then fails the publish (as nats-py's js timeout)
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"


@dataclass(frozen=True)
class Appended:
    seq: int
    duplicate: bool


class _PubAck(msgspec.Struct):
    """JetStream's reply to a publish: the stored position, or an API error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAck).decode


def _settle(future: asyncio.Future[Appended], msg: Msg) -> None:
    """Resolve a publish from its ack, with the typed nats-py error when it was refused."""
    if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
        future.set_exception(nats.js.errors.NoStreamResponseError())
        return
    try:
        ack = _decode_pub_ack(msg.data)
        if ack.error is not None:
            nats.js.errors.APIError.from_error(ack.error)  # raises the typed error
    except nats.js.errors.APIError as err:
        future.set_exception(err)
    except msgspec.DecodeError as err:
        future.set_exception(nats.js.errors.APIError(description=f"bad publish ack: {err}"))
    else:
        future.set_result(Appended(seq=ack.seq, duplicate=ack.duplicate))


class AckedPublisher:
    """Publishes on one connection; each returns a future for its JetStream ack."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        # acks arrive on one wildcard inbox, keyed by a counter token
        self._prefix: str | None = None
        self._ready: asyncio.Future[None] | None = None
        self._next = 0
        self._acks: dict[int, asyncio.Future[Appended]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._sub: Any = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Appended]:
        """Send; the returned future resolves with the ack (or its error)."""
        if self._prefix is None:
            await self._start()
        token = self._next
        self._next = token + 1
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}{token}", headers=headers)
        except BaseException:
            self._acks.pop(token, None)
            raise
        return future

    async def _start(self) -> None:
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._subscribe())
        await asyncio.shield(self._ready)

    async def _subscribe(self) -> None:
        prefix = f"{self.nc.new_inbox()}."
        cut = len(prefix)
        acks = self._acks

        async def on_ack(msg: Msg) -> None:
            try:
                future = acks.pop(int(msg.subject[cut:]), None)
            except ValueError:
                return
            if future is not None and not future.done():
                _settle(future, msg)

        self._sub = await self.nc.subscribe(f"{prefix}*", cb=on_ack)
        self._sweeper = asyncio.create_task(self._expire(), name="bus-ack-timeouts")
        self._prefix = prefix

    async def _expire(self, every: float = 0.5) -> None:
        """Fail publishes whose ack has not come back within ``PUBLISH_TIMEOUT``.

        One timer for all publishes instead of one each: tokens grow with time, so
        remembering the next token every ``every`` seconds bounds which ones are overdue.
        """
        marks: deque[tuple[float, int]] = deque()
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            marks.append((now, self._next))
            overdue = -1
            while marks and marks[0][0] <= now - PUBLISH_TIMEOUT:
                overdue = marks.popleft()[1]
            expired: list[int] = []
            for token in self._acks:  # insertion order is token order
                if token >= overdue:
                    break
                expired.append(token)
            for token in expired:
                future = self._acks.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())
