"""Retrying a transient failure: capped exponential back-off with jitter, told once.

A NATS blip must neither kill a runner nor fill its log: the first failure of an
episode is logged, the rest wait quietly, and the recovery is logged once.
"""

from __future__ import annotations

import asyncio
import random
import time

import structlog
from structlog.typing import FilteringBoundLogger

log = structlog.get_logger("tb.agent")


class Backoff:
    """One kind of retried operation (``what``): how long to wait next, and what to say.

    Delays grow from ``base`` by doubling up to ``cap``, each drawn with full jitter
    from the upper half of the current step, so runners that lost the same server do
    not come back in lockstep.
    """

    def __init__(
        self,
        what: str,
        *,
        base: float = 0.1,
        cap: float = 5.0,
        logger: FilteringBoundLogger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.what, self.base, self.cap = what, base, cap
        self.log = logger or log
        self.failures = 0  # in the current episode
        self.episodes = 0  # episodes begun since start
        self._rng = rng or random.Random()
        self._since = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def next_delay(self) -> float:
        step = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        return self._rng.uniform(step / 2, step)

    def failed(self, err: BaseException | str) -> float:
        """Record a failure; returns how long to wait before the next try."""
        if self.failures == 0:
            self.episodes += 1
            self._since = time.monotonic()
            self.log.warning(f"{self.what}.retrying", error=describe(err))
        delay = self.next_delay()
        self.failures += 1
        return delay

    async def wait(self, err: BaseException | str) -> None:
        """Record a failure and wait the back-off before the caller tries again."""
        await asyncio.sleep(self.failed(err))

    def succeeded(self) -> None:
        """End the episode (if any): one line says how long it lasted."""
        if self.failures:
            self.log.info(
                f"{self.what}.recovered",
                failures=self.failures,
                seconds=round(time.monotonic() - self._since, 3),
            )
            self.failures = 0


def describe(err: BaseException | str) -> str:
    if isinstance(err, str):
        return err
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
