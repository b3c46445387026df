"""Keep a long-lived component running: restart it with capped, jittered back-off.

One rule for both levels of supervision (DESIGN §1.8): ``tb up`` restarts a child
process that exited, and ``supervise`` restarts an in-process component (the
dispatcher, the exhausted-delivery watch, the runner) that raised. Transient errors
inside a component are its own to retry; this is the net under it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("tb.supervise")


@dataclass
class Backoff:
    """Capped exponential back-off with jitter, reset once the component ran stably.

    The n-th restart of an episode waits between half and all of
    ``min(cap, base * 2**(n-1))`` seconds; jitter keeps several crashed components
    (or several machines) from retrying in lockstep. A run of at least
    ``stable_after`` seconds ends the episode: the next crash starts again at ``base``.
    """

    base: float = 0.5
    cap: float = 30.0
    stable_after: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    restarts: int = 0  # restarts in the current episode

    def ran_for(self, seconds: float) -> None:
        """Record how long the component ran before it stopped."""
        if seconds >= self.stable_after:
            self.restarts = 0

    @property
    def new_episode(self) -> bool:
        """True when the next restart is the first of an episode."""
        return self.restarts == 0

    def next_delay(self) -> float:
        """Count a restart and return how long to wait before it."""
        self.restarts += 1
        ceiling = self._ceiling()
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    @property
    def capped(self) -> bool:
        """The wait has reached the cap: the component keeps crashing."""
        return self._ceiling() >= self.cap

    def _ceiling(self) -> float:
        # the exponent stops growing long before a float overflows (days of crashing)
        return min(self.cap, self.base * 2.0 ** min(self.restarts - 1, 40))


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    backoff: Backoff | None = None,
    stopping: asyncio.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Await ``run()`` until it returns; after an exception, wait and call it again.

    ``run`` builds a fresh instance each time (a crashed object's state is not
    trusted). Cancellation, ``SystemExit`` and ``KeyboardInterrupt`` pass through.
    The first crash of an episode is logged with its traceback, later ones in one
    line each. ``stopping`` ends the wait between two runs.
    """
    backoff = backoff or Backoff()
    stopping = stopping or asyncio.Event()
    while not stopping.is_set():
        started = clock()
        try:
            await run()
            return
        except Exception as err:
            if _being_cancelled():
                # a library turned our cancel into another error: stop, don't restart
                raise asyncio.CancelledError() from err
            backoff.ran_for(clock() - started)
            first = backoff.new_episode
            delay = backoff.next_delay()
            fields = {
                "component": name,
                "restart": backoff.restarts,
                "in_seconds": round(delay, 2),
            }
            if first:
                log.exception("component.crashed", **fields)
            else:
                log.warning(
                    "component.crashed_again", error=repr(err), capped=backoff.capped, **fields
                )
        # asyncio.wait, not a timeout scope: a cancel that lands as the deadline
        # passes is never mistaken for the deadline (Python 3.11 timeouts can)
        waiter = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait([waiter], timeout=delay)
        finally:
            waiter.cancel()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
