"""Errors that pass, and how the engine's loops wait them out.

A NATS timeout, no responders, a connection being re-established or a JetStream API
error other than a concurrency conflict says nothing about the work: the loop that
met it waits (capped exponential back-off with jitter) and tries again, and says so
once per episode — when it starts and when it is over — not once per retry. A
connection this process closed itself is not transient: the process is stopping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from engine.cancellation import raise_if_cancelled

log = structlog.get_logger("tb.engine")

T = TypeVar("T")

WRONG_LAST_SEQUENCE = 10071  # JetStream: the expected last subject sequence moved on


def is_transient(err: BaseException, nc: Client | None = None) -> bool:
    """Whether ``err`` is NATS being unavailable for a while, not a fault of the work."""
    if isinstance(err, nats.errors.ConnectionClosedError):
        return nc is None or not nc.is_closed
    if isinstance(err, nats.js.errors.APIError):
        return err.err_code != WRONG_LAST_SEQUENCE
    return isinstance(
        err,
        nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.StaleConnectionError
        | nats.errors.OutboundBufferLimitError
        | nats.js.errors.NoStreamResponseError
        | TimeoutError,
    )


@dataclass
class Backoff:
    """Waits between retries of one loop: ``base`` doubling up to ``cap``, with jitter."""

    what: str  # names the loop in the log lines
    base: float = 0.1
    cap: float = 5.0
    failures: int = 0
    _since: float = field(default=0.0)

    async def failed(self, err: BaseException) -> None:
        """Note a transient error and wait before the next try."""
        raise_if_cancelled()  # a cancel lost inside nats-py must not keep the loop going
        if self.failures == 0:
            self._since = time.monotonic()
            log.warning("nats.unavailable", loop=self.what, error=repr(err), retrying=True)
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 16))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def succeeded(self) -> None:
        """The loop got through: end the episode, if there was one."""
        if self.failures:
            waited = round(time.monotonic() - self._since, 1)
            log.info("nats.available", loop=self.what, retries=self.failures, seconds=waited)
            self.failures = 0


async def until_done(step: Callable[[], Awaitable[T]], backoff: Backoff, nc: Client) -> T:
    """Run ``step`` until it gets through NATS trouble, waiting ``backoff`` between tries;
    other errors propagate."""
    while True:
        try:
            result = await step()
        except Exception as err:
            if not is_transient(err, nc):
                raise
            await backoff.failed(err)
        else:
            backoff.succeeded()
            return result
