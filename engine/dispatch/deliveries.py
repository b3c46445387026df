"""Which work items the platforms' queues have handed to a runner, as their consumers say.

A work item waits in its platform's queue (one shared durable consumer) until a runner
has a free slot; when a job's instance count exceeds the fleet's slots that may take
longer than any session. The stall clock of an item starts when it is first seen
delivered, so waiting for a slot is never mistaken for being stuck.

The consumers are asked at most every ``interval``, and only while some in-flight item
has not been seen delivered: an item's clock starts up to that late, never early. What
was seen is kept in the snapshot; after a restart an item dispatched since the snapshot
is seen delivered at the first look, which can only delay its stall.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from engine.bus import Bus
from engine.dispatch.state import DispatchState


@dataclass
class DeliveryWatch:
    bus: Bus
    interval: timedelta = timedelta(seconds=1)
    _asked_at: datetime | None = None

    async def observe(self, state: DispatchState, clock: Callable[[], datetime]) -> None:
        """Tell ``state`` how far each consumer with undelivered items has delivered."""
        now = clock()
        if self._asked_at is not None and now - self._asked_at < self.interval:
            return
        consumers = state.awaiting_delivery()
        if not consumers:
            return
        self._asked_at = now
        for consumer in sorted(consumers):
            up_to = await self.bus.delivered_up_to(consumer)
            if up_to is not None:  # no consumer yet: nothing was delivered
                state.delivered(consumer, up_to, clock())  # seen now, after the answer
