"""The dispatcher loop: follow the log, plan, publish. All I/O of dispatching lives here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from engine.bus import Bus, ConcurrencyConflict, Expect
from engine.dispatch.state import Action, Dispatch, DispatchState, Finish, StartOrRefuse
from engine.errors import Rejected
from engine.ids import new_id, utcnow
from engine.jobs.decider import FinishJob, JobCommand, Meta, StartJob, decide
from schemas import subjects
from schemas.events import Envelope, FlowDispatched, FlowDone, FlowFailed, TbEvent

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
    bus: Bus
    clock: Callable[[], datetime] = utcnow
    actor: str = "system"
    tick_interval: float = 0.5
    max_dispatches_per_tick: int = 1000
    state: DispatchState = field(default_factory=DispatchState)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ahead: set[int] = field(default_factory=set)  # seqs applied locally before the reader saw them
    _caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Catch up with the log before the first decision, then plan on every change."""
        target = await self.bus.last_seq()
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
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick_interval)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

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
                    continue
                self.state.apply(env)
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
        scope = subjects.job_stream_filter(action.job_id)
        try:
            for event in decide(plan.job, cmd, meta):
                expected = plan.job.version
                ack = await self.bus.append(
                    event,
                    msg_id=subjects.aggregate_msg_id(scope, expected, type(event).__name__),
                    expect=Expect(scope, expected),
                )
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
