"""Planned actions become appends, each checked against the state as it is when it goes out.

Between planning and publishing the reader may fold in a cancel, a pause, a revoked
consent or a finished flow. An action names what to do; the facts it needs (targets,
counts, authorised hosts) are read here, from the current state, right before the
event is built, and an action that no longer holds is dropped (the next tick plans again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from engine.bus import Bus, ConcurrencyConflict
from engine.dispatch.reader import StateReader
from engine.dispatch.state import Dispatch, Finish, JobAction, Start
from engine.errors import Rejected
from engine.jobs.decider import FinishJob, JobCommand, JobStatus, Meta, StartJob
from engine.jobs.service import append_decision
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.ids import new_id

log = structlog.get_logger("tb.dispatcher")


@dataclass
class ActionWriter:
    bus: Bus
    reader: StateReader
    actor: str = "system"
    new_id: Callable[[], str] = new_id

    async def transition(self, action: JobAction, now: datetime) -> None:
        """Append the job's next event with optimistic concurrency, deciding on the state now."""
        state = self.reader.state
        plan = state.jobs.get(action.job_id)
        if plan is None:
            return  # ended since it was planned
        cmd: JobCommand
        match action:
            case Start() if plan.job.status == JobStatus.CREATED:
                cmd = StartJob(action.job_id, state.authorised_hosts(now))
            case Finish() if state.finishable(plan):
                cmd = FinishJob(action.job_id, plan.done, plan.failed)
            case _:
                return
        meta = Meta(id=self.new_id(), at=now, actor=self.actor)
        try:
            command_id = self.new_id()  # one per action: a retry is the next tick's decision
            for event, ack in await append_decision(self.bus, plan.job, cmd, meta, command_id):
                self.reader.apply_own(ack.seq, event)
                log.info("job." + type(event).__name__, job_id=action.job_id, seq=ack.seq)
        except ConcurrencyConflict:
            pass  # another writer moved the job: the reader brings it, the next tick decides
        except Rejected as err:
            log.warning("dispatcher.rejected", job_id=action.job_id, error=str(err))

    async def dispatch(self, dispatches: list[Dispatch], now: datetime) -> int:
        """Publish the work items that still hold; returns how many went out."""
        state = self.reader.state
        items: list[tuple[FlowDispatched, str]] = []
        hosts: dict[str, list[str]] = {}
        for d in dispatches:
            if not state.dispatchable(d, now):
                continue
            job = state.jobs[d.job_id].job
            target = job.targets[d.target_index]
            allowed = hosts.get(d.job_id)
            if allowed is None:
                allowed = hosts[d.job_id] = sorted(job.allowed_hosts)
            event = FlowDispatched(
                id=self.new_id(),
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
        if not items:
            return 0
        acks = await self.bus.append_pipelined(items)
        for (dispatched, _), ack in zip(items, acks, strict=True):
            self.reader.apply_own(ack.seq, dispatched)
        log.debug("dispatcher.dispatched", count=len(items))
        return len(items)
