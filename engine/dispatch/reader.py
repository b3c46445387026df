"""Follows the log into the dispatcher's state.

The dispatcher applies its own appends as soon as JetStream acks them, before the
reader delivers them: planning must see a flow it just dispatched as in flight.
``apply_own`` remembers their sequences so that the reader skips them when they
arrive, and leaves ``position`` (how far the reader got) where the reader put it.

A message on a job's subjects that the bus quarantined still counts for that job:
it moved the job's last subject sequence (which the job's next append must expect),
and a JobCreated that no one can read, stored as its job's first message, makes a job
the dispatcher refuses rather than leaving it 'created' for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.js.errors

from engine.bus import Batch, Bus
from engine.dispatch.state import DispatchState
from engine.transient import Backoff, is_transient
from schemas import subjects
from schemas.events import Envelope, JobCreated, TbEvent
from schemas.ids import is_valid_id
from schemas.quarantine import QuarantinedMessage


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
    backoff: Backoff = field(default_factory=lambda: Backoff("dispatcher-reader"))
    _ahead: set[int] = field(default_factory=set)  # own appends the reader has not reached
    _caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_caught_up(self) -> None:
        await self._caught_up.wait()

    async def follow(self, catch_up_to: int) -> None:
        """Apply the log from the state's position on, for ever; NATS trouble is waited out.

        ``catch_up_to`` is the stream's last sequence when the dispatcher started: once
        the reader is there, the state is the log's and planning may begin. That
        sequence may belong to an event outside the filter (a runner registering), so
        the reader also says when it has delivered all there was.
        """
        while True:
            try:
                await self._read(catch_up_to)
            except Exception as err:
                if not is_transient(err, self.bus.nc):
                    raise
                await self.backoff.failed(err)  # then read on from the state's position

    async def _read(self, catch_up_to: int) -> None:
        if catch_up_to - self.state.position > self.unfiltered_catch_up:
            # the events planning does not read (FlowStarted, runners…) change nothing
            async for batch in self.bus.read_batches(
                self.state.position + 1, None, follow=False, batch=self.batch
            ):
                await self._deliver(batch)
        if catch_up_to <= self.state.position:
            self._caught_up.set()
        async for batch in self.bus.read_batches(
            self.state.position + 1,
            subjects.DISPATCHER_INPUTS,
            batch=self.batch,
            on_caught_up=self._caught_up.set,
            known=self._ahead,  # its own appends, applied when acked: not decoded again
        ):
            await self._deliver(batch)
            if batch.last_seq >= catch_up_to:
                self._caught_up.set()

    async def _deliver(self, batch: Batch) -> None:
        self.deliver(batch, await self._first_creations(batch.quarantined))
        self.backoff.succeeded()

    async def _first_creations(self, quarantined: list[QuarantinedMessage]) -> set[int]:
        """Sequences of unreadable JobCreated messages stored before anything else on their
        job's subjects: jobs that exist only as that message."""
        first: set[int] = set()
        for q in quarantined:
            job = subjects.job_of_subject(q.subject)
            if job is None or job[1] != JobCreated.__name__ or not is_valid_id(job[0]):
                continue
            if job[0] in self.state.jobs:
                continue  # a live job: only its version moves
            try:  # one request: the first message on the job's subjects
                oldest = await self.bus.js.get_msg(
                    subjects.EVENTS_STREAM,
                    seq=1,
                    subject=subjects.job_stream_filter(job[0]),
                    next=True,
                )
            except nats.js.errors.NotFoundError:
                continue  # gone from the stream since it was read
            if oldest.seq == q.seq:
                first.add(q.seq)
        return first

    def deliver(self, batch: Batch, first_creations: set[int] | None = None) -> None:
        """Fold in what the log holds, in stream order (events and quarantined messages)."""
        for seq in batch.known:
            self._ahead.discard(seq)
        items = _merged(batch.envelopes, batch.quarantined) if batch.quarantined else None
        for env in items or batch.envelopes:
            if isinstance(env, Envelope):
                if env.seq in self._ahead:
                    self._ahead.discard(env.seq)
                    self.state.position = max(self.state.position, env.seq)
                    continue
                self.state.apply(env)
            else:
                job = subjects.job_of_subject(env.subject)
                if job is not None and is_valid_id(job[0]):
                    first = env.seq in (first_creations or ())
                    self.state.unreadable(job[0], env.seq, job[1], env.reason, first)
        self.state.position = max(self.state.position, batch.last_seq)
        self.applied += len(batch.envelopes)
        self.on_change()

    def apply_own(self, seq: int, event: TbEvent) -> None:
        """Fold in an event this process appended and JetStream stored at ``seq``."""
        if seq <= self.state.position:
            return  # the reader already delivered it (a duplicate ack)
        self._ahead.add(seq)
        self.state.apply_event(seq, event)  # the reader owns the position: it stays


def _merged(
    envelopes: list[Envelope], quarantined: list[QuarantinedMessage]
) -> list[Envelope | QuarantinedMessage]:
    items: list[Envelope | QuarantinedMessage] = [*envelopes, *quarantined]
    items.sort(key=lambda item: item.seq)  # sequences are unique in a stream
    return items
