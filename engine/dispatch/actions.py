"""Planned actions become appends, each checked against the state as it is when it goes out.

Between planning and publishing the reader may fold in a cancel, a pause, a revoked
consent or a finished flow. An action names what to do; the facts it needs (targets,
counts, authorised hosts, the attempt in flight) are read here, from the current
state, right before the event is built, and an action that no longer holds is
dropped (the next tick plans again).

Job events go through the job decider with optimistic concurrency and are folded in
at once (no one else can write the job's subjects in between). Flow ends (stalled,
revoked) carry the msg-id ``schemas.subjects`` gives them, shared with whoever else may
write them, and are folded in when the reader brings them: a runner's outcome stored
just before must stand, as it does for every other reader of the log.
An unexpected error on one job marks that job broken (it is ended with the reason on
the next tick); errors of NATS itself propagate, for the loop to retry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import nats.errors
import structlog

from engine.bus import Bus, ConcurrencyConflict
from engine.dispatch.reader import StateReader
from engine.dispatch.state import (
    STALL_MARGIN,
    Abort,
    Dispatch,
    DispatchState,
    FailRevoked,
    Finish,
    JobAction,
    JobPlan,
    PauseRevoked,
    Stall,
    Start,
)
from engine.jobs.decider import (
    AbortJob,
    FinishJob,
    JobCommand,
    JobStatus,
    Meta,
    PauseJob,
)
from engine.jobs.service import append_decision
from schemas import subjects
from schemas.consent_state import lapse_reason
from schemas.events import CONSENT_REVOKED, FlowDispatched, FlowFailed, FlowStalled
from schemas.ids import new_id
from schemas.values import JobSettings

log = structlog.get_logger("tb.dispatcher")


@dataclass
class ActionWriter:
    bus: Bus
    reader: StateReader
    actor: str = "system"
    stall_margin: timedelta = STALL_MARGIN
    new_id: Callable[[], str] = new_id

    async def carry_out(self, action: JobAction, now: datetime) -> None:
        """Append what ``action`` calls for, if it still holds on the state now."""
        plan = self.reader.state.jobs.get(action.job_id)
        if plan is None:
            return  # ended since it was planned
        try:
            match action:
                case Stall():
                    await self._stall(action, now)
                case FailRevoked():
                    await self._fail_revoked(action, now)
                case _:
                    await self._decide(plan, action, now)
        except (nats.errors.Error, OSError):
            raise  # NATS trouble is the loop's to retry, not the job's fault
        except Exception as err:
            if isinstance(action, Abort):
                # the last resort failed too: stop planning for the job here, so one job's
                # fault cannot hold up the others (the log still says how it stands)
                log.error("job.abort_failed", job_id=action.job_id, exc_info=err)
                self.reader.state.drop(action.job_id)
                return
            kind = type(action).__name__
            self.reader.state.break_job(plan, f"{kind} failed: {err!r}", err)

    async def _decide(self, plan: JobPlan, action: JobAction, now: datetime) -> None:
        """Job transitions: read-decide-append through the job decider."""
        state = self.reader.state
        cmd: JobCommand
        match action:
            case Abort() if plan.broken:
                cmd = AbortJob(action.job_id, plan.broken, plan.done, plan.failed)
            case Start() if plan.job.status == JobStatus.CREATED and not plan.broken:
                cmd = state.start_command(plan, now)
            case PauseRevoked(host=host) if plan.job.status == JobStatus.RUNNING and state.lapsed(
                host, now
            ):
                cmd = PauseJob(action.job_id, reason=lapse_reason(state.consent_of(host), host))
            case Finish() if state.finishable(plan):
                cmd = FinishJob(action.job_id, plan.done, plan.failed)  # the counts of now
            case _:
                return
        meta = Meta(id=self.new_id(), at=now, actor=self.actor)
        command_id = self.new_id()  # one per action: a retry is the next tick's decision
        try:
            for event, ack in await append_decision(self.bus, plan.job, cmd, meta, command_id):
                self.reader.apply_own(ack.seq, event)
                log.info("job." + type(event).__name__, job_id=action.job_id, seq=ack.seq)
        except ConcurrencyConflict:
            pass  # another writer moved the job: the reader brings it, the next tick decides
        # a Rejected here is not a caller's mistake but a state the checks above should
        # have ruled out (counts that do not add up): it breaks the job, like any fault

    async def _stall(self, action: Stall, now: datetime) -> None:
        state = self.reader.state
        waited = state.stalled(action, now, self.stall_margin)
        if waited is None:
            return
        slot = state.jobs[action.job_id].flows[action.flow_id]
        event = FlowStalled(
            id=self.new_id(),
            at=now,
            actor=self.actor,
            job_id=action.job_id,
            flow_id=action.flow_id,
            attempt=action.attempt,
            target_index=slot.target_index,
            waited_seconds=waited,
        )
        await self.bus.append(event, msg_id=subjects.stalled_msg_id(action.flow_id, action.attempt))
        state.ending.add((action.flow_id, action.attempt))  # folded in when the reader brings it
        log.warning(
            "flow.stalled",
            job_id=action.job_id,
            flow_id=action.flow_id,
            attempt=action.attempt,
            waited_seconds=round(waited, 1),
        )

    async def _fail_revoked(self, action: FailRevoked, now: datetime) -> None:
        state = self.reader.state
        slot = state.in_flight_slot(action.job_id, action.flow_id, action.attempt)
        if slot is None or not state.lapsed(slot.host, now):
            return
        event = FlowFailed(
            id=self.new_id(),
            at=now,
            actor=self.actor,
            job_id=action.job_id,
            flow_id=action.flow_id,
            attempt=action.attempt,
            target_index=slot.target_index,
            reason=CONSENT_REVOKED,
            retryable=False,
        )
        # the runner that holds the item writes the same id: whoever is first is stored
        await self.bus.append(event, msg_id=subjects.revoked_msg_id(action.flow_id, action.attempt))
        state.ending.add((action.flow_id, action.attempt))  # folded in when the reader brings it

    async def dispatch(self, dispatches: list[Dispatch], now: datetime) -> int:
        """Publish the work items that still hold; returns how many went out."""
        state = self.reader.state
        authorised = state.authorised_hosts(now)
        items: list[tuple[FlowDispatched, str]] = []
        # what a job's work items share, worked out on its first item in this batch: the
        # state does not change while the batch is built
        shared: dict[str, _JobItems] = {}
        for d in dispatches:
            if not state.dispatchable(d, now, authorised):
                continue
            plan = state.jobs[d.job_id]
            try:
                common = shared.get(d.job_id)
                if common is None:
                    common = shared[d.job_id] = _job_items(state, plan, authorised)
                msg_id = subjects.dispatch_msg_id(d.flow_id, d.attempt)
                proxies = state.proxy_candidates(plan, d.flow_id, d.attempt) or []
                item = self._work_item(plan, d, common, proxies, now)
                items.append((item, msg_id))
            except Exception as err:
                state.break_job(plan, f"dispatching failed: {err!r}", err)
        items = [(e, m) for e, m in items if not state.jobs[e.job_id].broken]
        if not items:
            return 0
        acks = await self.bus.append_pipelined(items)
        for (dispatched, _), ack in zip(items, acks, strict=True):
            self.reader.apply_own(ack.seq, dispatched)
        log.debug("dispatcher.dispatched", count=len(items))
        return len(items)

    def _work_item(
        self,
        plan: JobPlan,
        d: Dispatch,
        common: _JobItems,
        proxies: list[str],
        now: datetime,
    ) -> FlowDispatched:
        job = plan.job
        target = job.targets[d.target_index]
        return FlowDispatched(
            id=self.new_id(),
            at=now,
            actor=self.actor,
            job_id=d.job_id,
            flow_id=d.flow_id,
            attempt=d.attempt,
            target_index=d.target_index,
            url=target.url,
            clicks=target.clicks,
            session_seconds=common.session_seconds,
            allowed_hosts=common.allowed,
            seed=d.seed,
            platform=job.platform,
            referrer=target.referrer,
            allowed_ports=common.ports,
            proxies=proxies,
            settings=common.settings,
            # a runner needs the catalogue only for a device the job names
            device_catalogue=job.device_catalogue if job.settings.devices else None,
        )


@dataclass(frozen=True, slots=True)
class _JobItems:
    """What every work item of one job carries alike, as of now."""

    allowed: list[str]  # the consents of now, not those of when the job started
    ports: dict[str, list[int]]
    session_seconds: float
    settings: JobSettings | None


def _job_items(state: DispatchState, plan: JobPlan, authorised: frozenset[str]) -> _JobItems:
    allowed = sorted(plan.host_set & authorised)
    settings = plan.job.settings
    return _JobItems(
        allowed=allowed,
        ports={h: sorted(_consent_ports(state, h)) for h in allowed},
        session_seconds=settings.session.longest,
        settings=settings_for_runners(settings),
    )


def _consent_ports(state: DispatchState, host: str) -> frozenset[int]:
    consent = state.consent_of(host)
    assert consent is not None  # an authorised host has a consent
    return consent.ports


# what a runner reads of a job's settings: how a flow behaves and where names resolve
BEHAVIOUR = (
    "session_duration",
    "page_traffic",
    "traffic_delay",
    "human_surfing",
    "click_timing",
    "external_click_ratio",
    "devices",
    "platform_switching",
    "dns",
)


_PLAIN = JobSettings()


def settings_for_runners(settings: JobSettings) -> JobSettings | None:
    """The settings a work item carries: ``None`` when a runner would behave the same
    without them (it takes a constant session of the item's ``session_seconds``), which
    keeps the work item of a plain job small (each is stored, and read by a runner and
    by the engine)."""
    if all(getattr(settings, name) == getattr(_PLAIN, name) for name in BEHAVIOUR):
        return None
    return settings
