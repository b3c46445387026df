"""Follows the log into the dispatcher's state.

The dispatcher applies its own appends as soon as JetStream acks them, before the
reader delivers them: planning must see a flow it just dispatched as in flight.
``apply_own`` remembers their sequences so that the reader skips them when they
arrive, and leaves ``position`` (how far the reader got) where the reader put it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.bus import Bus
from engine.dispatch.state import DispatchState
from schemas import subjects
from schemas.events import Envelope, TbEvent


@dataclass
class StateReader:
    bus: Bus
    state: DispatchState
    on_change: Callable[[], None] = lambda: None
    batch: int = 1000
    # further behind than this, catch up on the whole stream first: JetStream serves a
    # consumer with several filters slowly from far back (its cost grows with the number
    # of distinct subjects, one per job and event type), one without filters fast
    unfiltered_catch_up: int = 10_000
    applied: int = 0  # events applied from the log since this reader began
    _ahead: set[int] = field(default_factory=set)  # own appends the reader has not reached
    _caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_caught_up(self) -> None:
        await self._caught_up.wait()

    async def follow(self, catch_up_to: int) -> None:
        """Apply the log from the state's position on, for ever.

        ``catch_up_to`` is the stream's last sequence when the dispatcher started: once
        the reader is there, the state is the log's and planning may begin. That
        sequence may belong to an event outside the filter (a runner registering), so
        the reader also says when it has delivered all there was.
        """
        if catch_up_to - self.state.position > self.unfiltered_catch_up:
            # the events planning does not read (FlowStarted, runners…) change nothing
            async for batch in self.bus.read(
                self.state.position + 1, None, follow=False, batch=self.batch
            ):
                self.deliver(batch)
        if catch_up_to <= self.state.position:
            self._caught_up.set()
        async for batch in self.bus.read(
            self.state.position + 1,
            subjects.DISPATCHER_INPUTS,
            batch=self.batch,
            on_caught_up=self._caught_up.set,
        ):
            self.deliver(batch)
            if batch[-1].seq >= catch_up_to:
                self._caught_up.set()

    def deliver(self, batch: Sequence[Envelope]) -> None:
        """Fold in events read from the log, in stream order."""
        for env in batch:
            if env.seq in self._ahead:
                self._ahead.discard(env.seq)
                self.state.position = max(self.state.position, env.seq)
                continue
            self.state.apply(env)
        self.applied += len(batch)
        self.on_change()

    def apply_own(self, seq: int, event: TbEvent) -> None:
        """Fold in an event this process appended and JetStream stored at ``seq``."""
        if seq <= self.state.position:
            return  # the reader already delivered it (a duplicate ack)
        self._ahead.add(seq)
        position = self.state.position  # the reader owns the position; we only ran ahead
        self.state.apply(Envelope(seq=seq, subject=subjects.subject_for(event), event=event))
        self.state.position = position
