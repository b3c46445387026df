"""A cancel that a library swallowed still stops the engine's loops.

On Python 3.11 ``asyncio.wait_for`` (which nats-py awaits every request with) returns
its result instead of raising when that result and a cancel land in the same turn of
the event loop. Here a step of each loop swallows a cancel the same way; the loop must
end at its next turn all the same, not run on waiting for another cancel.
"""

from __future__ import annotations

import asyncio
import contextlib

from engine.bus import Bus
from engine.dispatcher import Dispatcher
from schemas.events import LicenseAssigned
from schemas.ids import new_id, utcnow

WAIT = 10


async def swallow_a_cancel(inside: asyncio.Event) -> None:
    """What 3.11's ``wait_for`` does when its result arrives with the cancel."""
    inside.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(WAIT * 2)


async def test_the_dispatcher_ends_at_its_next_turn_after_a_cancel_was_swallowed(
    bus: Bus,
) -> None:
    dispatcher = Dispatcher(bus, tick_interval=0.05)
    plain_tick, armed, inside = dispatcher.tick, asyncio.Event(), asyncio.Event()

    async def tick() -> None:
        await plain_tick()
        if armed.is_set():
            await swallow_a_cancel(inside)

    dispatcher.tick = tick  # type: ignore[method-assign]
    running = asyncio.create_task(dispatcher.run())
    await asyncio.wait_for(dispatcher.wait_ready(), WAIT)
    armed.set()
    await asyncio.wait_for(inside.wait(), WAIT)
    running.cancel()
    done, _ = await asyncio.wait([running], timeout=WAIT)
    assert running in done and running.cancelled()


async def test_a_reader_ends_at_its_next_batch_after_a_cancel_was_swallowed(bus: Bus) -> None:
    event = LicenseAssigned(id=new_id(), at=utcnow(), actor="t", user_id="u1", plan="trial")
    await bus.append(event, msg_id=new_id())
    inside = asyncio.Event()

    async def follow() -> None:
        async for _ in bus.read_batches(1, idle_timeout=0.05):  # follows: never ends itself
            await swallow_a_cancel(inside)

    running = asyncio.create_task(follow())
    await asyncio.wait_for(inside.wait(), WAIT)
    running.cancel()
    done, _ = await asyncio.wait([running], timeout=WAIT)
    assert running in done and running.cancelled()
