"""The dispatcher loop: follow the log, plan, publish. All I/O of dispatching lives here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import nats.errors
import structlog

from engine.bus import Bus, ConcurrencyConflict
from engine.dispatch import snapshot
from engine.dispatch.snapshot import SnapshotStore
from engine.dispatch.state import Action, Dispatch, DispatchState, Finish, StartOrRefuse
from engine.errors import Rejected
from engine.jobs.decider import FinishJob, JobCommand, Meta, StartJob
from engine.jobs.service import append_decision
from schemas import subjects
from schemas.events import Envelope, FlowDispatched, FlowDone, FlowFailed, TbEvent
from schemas.ids import new_id, utcnow

log = structlog.get_logger("tb.dispatcher")

# only what planning folds in: FlowStarted, PageVisited, clicks… never change the plan,
# and reading them would add a third message (or more) per flow
DISPATCHER_INPUTS = [
    "tb.job.>",
    "tb.dispatch.>",
    subjects.flow_subject("*", FlowDone.__name__),
    subjects.flow_subject("*", FlowFailed.__name__),
    "tb.consent.>",
]


@dataclass
class Dispatcher:
    """Follows the log into a ``DispatchState``, plans, publishes.

    The state is checkpointed to the object store after ``snapshot_every_events``
    events the reader applied, or ``snapshot_interval`` seconds after the last
    checkpoint once the log moved on, whichever comes first; a restart reads the log
    from the checkpoint on, not from sequence 1.
    """

    bus: Bus
    clock: Callable[[], datetime] = utcnow
    actor: str = "system"
    tick_interval: float = 0.5
    max_dispatches_per_tick: int = 1000
    snapshot_every_events: int = 10_000
    snapshot_interval: float = 5.0
    state: DispatchState = field(default_factory=DispatchState)
    resumed_from: int = 0  # the first stream sequence this run asked the reader for
    saved_position: int = 0  # the reader position of the last stored snapshot
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ahead: set[int] = field(default_factory=set)  # seqs applied locally before the reader saw them
    _caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    _applied: int = 0  # events the reader applied since the last snapshot was taken
    _last_snapshot: float = field(default_factory=time.monotonic)
    _saving: asyncio.Task[None] | None = None
    _saved: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        """Catch up with the log before the first decision, then plan on every change."""
        target = await self.bus.last_seq()
        await self._restore(target)
        self.resumed_from = self.state.position + 1
        log.info("dispatcher.resuming", start_seq=self.resumed_from, last_seq=target)
        reader = asyncio.create_task(self._follow(target), name="dispatcher-reader")
        try:
            while not self._caught_up.is_set():
                await asyncio.wait(
                    [reader, asyncio.ensure_future(self._caught_up.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if reader.done():
                    reader.result()
            log.info("dispatcher.ready", position=self.state.position)
            while True:
                if reader.done():
                    reader.result()
                await self.tick()
                self._maybe_snapshot()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick_interval):
                        await self._wake.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if self._saving is not None:
                self._saving.cancel()  # the stored snapshot stays the previous, whole one
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._saving

    # -- checkpoint ---------------------------------------------------------------------

    async def _restore(self, last_seq: int) -> None:
        data = await SnapshotStore(self.bus).load()
        if data is None:
            return
        state = snapshot.decode(data)
        if state is None:
            log.warning("dispatcher.snapshot.ignored", reason="unknown format or undecodable")
            return
        if state.position > last_seq:
            # the stream was recreated under the snapshot: it describes another history
            log.warning("dispatcher.snapshot.ignored", reason="ahead of the stream")
            return
        self.state = state
        self.saved_position = state.position

    def _maybe_snapshot(self) -> None:
        """Take a snapshot when one is due and none is being stored; store it in the background."""
        if self._saving is not None and not self._saving.done():
            return
        position = self.state.position
        if position <= self.saved_position:
            return
        elapsed = time.monotonic() - self._last_snapshot
        if self._applied < self.snapshot_every_events and elapsed < self.snapshot_interval:
            return
        data = snapshot.encode(self.state)  # synchronous: a consistent cut of the state
        self._applied = 0
        self._last_snapshot = time.monotonic()
        self._saving = asyncio.create_task(self._save(data, position), name="dispatcher-snapshot")

    async def _save(self, data: bytes, position: int) -> None:
        try:
            await SnapshotStore(self.bus).save(data)
        except (nats.errors.Error, OSError) as err:
            # the log stays the truth: try again when the next snapshot is due
            log.warning("dispatcher.snapshot.failed", position=position, error=repr(err))
            return
        async with self._saved:
            self.saved_position = max(self.saved_position, position)
            self._saved.notify_all()
        log.debug("dispatcher.snapshot.saved", position=position, size=len(data))

    async def wait_ready(self) -> None:
        """Return once the state has caught up with the log (planning starts then)."""
        await self._caught_up.wait()

    async def wait_saved(self, position: int) -> None:
        """Return once a snapshot at ``position`` or later is stored."""
        async with self._saved:
            await self._saved.wait_for(lambda: self.saved_position >= position)

    async def _follow(self, catch_up_to: int) -> None:
        if catch_up_to == 0:
            self._caught_up.set()
        # the stream's last sequence may belong to an event outside our filter (a runner
        # registering): the reader also says when it has delivered all there was
        async for batch in self.bus.read(
            self.state.position + 1,
            DISPATCHER_INPUTS,
            batch=1000,
            on_caught_up=self._caught_up.set,
        ):
            for env in batch:
                if env.seq in self._ahead:
                    self._ahead.discard(env.seq)
                    self.state.position = max(self.state.position, env.seq)
                    continue
                self.state.apply(env)
            self._applied += len(batch)
            if batch[-1].seq >= catch_up_to:
                self._caught_up.set()
            self._wake.set()

    async def tick(self) -> None:
        now = self.clock()
        actions = self.state.plan(now, self.max_dispatches_per_tick)
        dispatches = [a for a in actions if isinstance(a, Dispatch)]
        for action in actions:
            if not isinstance(action, Dispatch):
                await self._transition(action, now)
        if dispatches:
            await self._dispatch(dispatches, now)

    async def _dispatch(self, dispatches: list[Dispatch], now: datetime) -> None:
        items: list[tuple[FlowDispatched, str]] = []
        hosts: dict[str, list[str]] = {}
        for d in dispatches:
            job = self.state.jobs[d.job_id].job
            target = job.targets[d.target_index]
            allowed = hosts.get(d.job_id)
            if allowed is None:
                allowed = hosts[d.job_id] = sorted(job.allowed_hosts)
            event = FlowDispatched(
                id=new_id(),
                at=now,
                actor=self.actor,
                job_id=d.job_id,
                flow_id=d.flow_id,
                attempt=d.attempt,
                target_index=d.target_index,
                url=target.url,
                clicks=target.clicks,
                session_seconds=job.settings.session_seconds,
                allowed_hosts=allowed,
                seed=d.seed,
                platform=job.platform,
                referrer=target.referrer,
            )
            items.append((event, subjects.dispatch_msg_id(d.flow_id, d.attempt)))
        acks = await self.bus.append_pipelined(items)
        for (dispatched, _), ack in zip(items, acks, strict=True):
            self._apply_own(ack.seq, dispatched)
        log.debug("dispatcher.dispatched", count=len(items))

    async def _transition(self, action: Action, now: datetime) -> None:
        plan = self.state.jobs[action.job_id]
        cmd: JobCommand
        if isinstance(action, StartOrRefuse):
            cmd = StartJob(action.job_id, action.authorised_hosts)
        elif isinstance(action, Finish):
            cmd = FinishJob(action.job_id, action.flows_done, action.flows_failed)
            plan.finishing = True
        else:
            return
        meta = Meta(id=new_id(), at=now, actor=self.actor)
        try:
            for event, ack in await append_decision(self.bus, plan.job, cmd, meta, new_id()):
                self._apply_own(ack.seq, event)
                log.info("job." + type(event).__name__, job_id=action.job_id, seq=ack.seq)
        except ConcurrencyConflict:
            # someone else (a cancel, a second engine) moved the job: the reader will
            # bring the new state and the next tick decides again
            plan.finishing = False
        except Rejected as err:
            plan.finishing = False
            log.warning("dispatcher.rejected", job_id=action.job_id, error=str(err))

    def _apply_own(self, seq: int, event: TbEvent) -> None:
        if seq <= self.state.position:
            return  # the reader already delivered it (a duplicate ack)
        self._ahead.add(seq)
        position = self.state.position  # the reader owns the position; we only ran ahead
        self.state.apply(Envelope(seq=seq, subject=subjects.subject_for(event), event=event))
        self.state.position = position
