"""Work intake: pull work items of the runner's platform, one slot each.

The platform's queue is one shared durable pull consumer (DESIGN §3). Intake takes
only as many items as it has free slots, so the dispatcher's ordering decides what
runs next. A slot belongs to one delivery of one work item: JetStream may hand the
same flow to the same runner again (the first delivery's ack wait ran out while it
still runs), and the two deliveries hold two slots until each ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine
from typing import Any, NamedTuple

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg

from agents.backoff import Backoff
from engine.bus import Bus
from engine.puller import delivery, stream_seq
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.stored import Undecodable, decode_stored
from schemas.values import Platform

log = structlog.get_logger("tb.agent")


class SlotKey(NamedTuple):
    """One delivery of one work item (the stream sequence tells apart two messages
    for one flow and attempt, as a republish after the dedupe window would be)."""

    flow_id: str
    attempt: int
    delivery: int
    seq: int


class Work(NamedTuple):  # made for every work item: a tuple is the cheapest record
    """A work item as delivered: the event, its message (to ack), where it sits, and
    the slot it holds."""

    item: FlowDispatched
    msg: Msg
    seq: int  # stream sequence
    delivery: int  # JetStream's delivery count, 1 the first time
    key: SlotKey


class Poison(Exception):
    """A message on the platform's subject that is not a work item anyone can run."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_work(msg: Msg) -> Work:
    """The work item a message holds, with its slot; raises ``Poison`` with the reason when
    it holds none (bad JSON, wrong shape, unknown type, an event not of its subject)."""
    seq, delivered = delivery(msg)
    try:
        item = decode_stored(msg.subject, msg.data, msg.headers)
    except Undecodable as err:
        raise Poison(err.reason) from None
    if not isinstance(item, FlowDispatched):
        raise Poison(f"a {type(item).__name__} is not a work item")
    # tuple.__new__ builds the named tuples without their Python-level __new__: this runs
    # for every work item
    key = tuple.__new__(SlotKey, (item.flow_id, item.attempt, delivered, seq))
    return tuple.__new__(Work, (item, msg, seq, delivered, key))


class Intake:
    """Hands out work items, each holding a slot until ``free`` is called with its key."""

    def __init__(
        self,
        bus: Bus,
        platform: Platform,
        *,
        slots: int,
        fetch_batch: int = 128,
        linger: float = 1.0,
    ) -> None:
        self.bus, self.platform, self.slots = bus, platform, slots
        self.fetch_batch, self.linger = fetch_batch, linger
        self.held: dict[SlotKey, Work] = {}
        self.poisoned = 0  # messages terminated because no runner can run them
        self.recreated = 0  # times the durable consumer was found gone and made again
        self.pulls = 0  # pull requests that got no answer
        self._durable = subjects.dispatch_consumer(platform.os, platform.browser)
        self._stopping = asyncio.Event()
        self._freed = asyncio.Event()
        self._retry = Backoff("intake.pull", base=0.2, cap=5.0)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.held)

    def free(self, key: SlotKey) -> None:
        if self.held.pop(key, None) is not None:
            self._freed.set()

    def stop(self) -> None:
        self._stopping.set()
        self._freed.set()

    async def open(self) -> None:
        """Make sure the platform's consumer exists; the engine provisions the streams.

        One that exists is only looked at: a runner with its own NATS credentials may
        read its consumer but not create or change it (the credential exchange made it).
        """
        told = False
        retry = Backoff("intake.consumer", base=0.2, cap=2.0)
        while not self._stopping.is_set():
            try:
                try:
                    await self.bus.js.consumer_info(subjects.EVENTS_STREAM, self._durable)
                except nats.js.errors.NotFoundError:
                    await self.bus.ensure_dispatch_consumer(self.platform.os, self.platform.browser)
                retry.succeeded()
                return
            except nats.js.errors.NotFoundError:
                if not told:
                    log.info("Waiting for the engine to provision the event streams")
                    told = True
                await asyncio.sleep(1.0)
            except nats.errors.Error as err:
                await retry.wait(err)

    async def items(self) -> AsyncGenerator[Work, None]:
        """Work items while not stopped; each yielded one holds a slot."""
        puller = await self.bus.puller(self._durable)
        try:
            while not self._stopping.is_set():
                free = self.free_slots
                if free <= 0:
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                try:
                    msgs = await puller.fetch(min(free, self.fetch_batch), linger=self.linger)
                except nats.errors.TimeoutError:
                    # nobody answered the pull: the consumer is gone or NATS is away
                    self.pulls += 1
                    await self._unless_stopped(self._recover())
                    continue
                except nats.errors.Error as err:
                    self.pulls += 1
                    await self._unless_stopped(self._retry.wait(err))
                    continue
                self._retry.succeeded()
                for msg in msgs:
                    try:
                        work = read_work(msg)
                    except Poison as poison:
                        await self._quarantine(msg, poison.reason)
                        continue
                    self.held[work.key] = work
                    yield work
        finally:
            await puller.close()

    async def _quarantine(self, msg: Msg, reason: str) -> None:
        """Record the message (logged once there), and never have it delivered again."""
        self.poisoned += 1
        await self.bus.quarantine.record(
            stream=subjects.EVENTS_STREAM,
            seq=stream_seq(msg),
            subject=msg.subject,
            raw=msg.data,
            reason=reason,
        )
        try:
            await msg.term()
        except nats.errors.Error as err:  # redelivered after the ack wait: terminated then
            log.warning("intake.term_failed", subject=msg.subject, error=str(err))

    async def _unless_stopped(self, waiting: Coroutine[Any, Any, None]) -> None:
        """Wait out a back-off or a recovery, but not past ``stop``: a runner told to stop
        while NATS is away leaves at once."""
        task = asyncio.ensure_future(waiting)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (task, stopping):
                pending.cancel()
            await asyncio.gather(task, stopping, return_exceptions=True)

    async def _recover(self) -> None:
        """After a pull nobody answered: recreate a deleted consumer, else back off."""
        try:
            await self.bus.js.consumer_info(subjects.EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            try:
                await self.bus.ensure_dispatch_consumer(self.platform.os, self.platform.browser)
            except nats.errors.Error as err:  # the stream itself is gone: wait for it
                await self._retry.wait(err)
                return
            self.recreated += 1
            log.warning("intake.consumer_recreated", consumer=self._durable)
            return
        except nats.errors.Error as err:
            await self._retry.wait(err)
            return
        # the consumer is there and did not answer in time: back off all the same
        await self._retry.wait("pull not answered")
