"""The dispatcher's view of the log and its pure planning step.

``DispatchState.apply`` folds events in (idempotently: the dispatcher applies its
own appends at once and sees them again from the stream); ``plan`` decides what to
publish next from the state and the time, doing no I/O.

Only live jobs are held: a job leaves the state when it ends, so planning and the
snapshot cost what the live jobs cost, however long the history. Only a JobCreated
brings a job in; any other event of a job the state does not hold changes nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from engine.jobs.decider import TERMINAL, Job, JobStatus, evolve
from schemas.consent_state import Consent, evolve_consent
from schemas.events import (
    ConsentEvent,
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    JobCreated,
    JobEvent,
    JobStarted,
)

RATE_WINDOW = timedelta(minutes=1)


class FlowStatus(StrEnum):
    PLANNED = "planned"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"


@dataclass
class FlowSlot:
    flow_id: str
    target_index: int
    host: str
    attempt: int = 0
    status: FlowStatus = FlowStatus.PLANNED


@dataclass
class JobPlan:
    job: Job
    created_seq: int
    flows: dict[str, FlowSlot] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)  # planned flow ids, retries first
    in_flight: int = 0
    done: int = 0
    failed: int = 0

    @property
    def terminal(self) -> int:
        return self.done + self.failed


def flow_id(job_id: str, target_index: int, n: int) -> str:
    return f"{job_id}_{target_index}_{n}"


def flow_seed(job: Job, flow: str) -> int:
    """``seed(job, flow)``: a flow's random choices replay the same way."""
    base = job.settings.seed if job.settings.seed is not None else job.job_id
    digest = hashlib.blake2b(f"{base}:{flow}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# -- actions the loop carries out ---------------------------------------------------
#
# An action names what to do, not the facts it was planned on: the loop re-reads the
# state when it carries one out, because the log may have moved on in between.


@dataclass(frozen=True)
class Start:
    """Start the job if every target host has valid consent, else refuse it."""

    job_id: str


@dataclass(frozen=True)
class Finish:
    """Every flow of the job is terminal: record the outcome with the counts of then."""

    job_id: str


@dataclass(frozen=True)
class Dispatch:
    job_id: str
    flow_id: str
    attempt: int
    target_index: int
    seed: int


JobAction = Start | Finish
Action = JobAction | Dispatch


@dataclass
class DispatchState:
    jobs: dict[str, JobPlan] = field(default_factory=dict)
    consents: dict[str, Consent] = field(default_factory=dict)
    domain_in_flight: Counter[str] = field(default_factory=Counter)
    domain_recent: dict[str, deque[datetime]] = field(default_factory=dict)
    position: int = 0

    # -- folding events in ----------------------------------------------------------

    def apply(self, env: Envelope) -> None:
        self.position = max(self.position, env.seq)
        event = env.event
        if isinstance(event, JobEvent):
            self._apply_job(env.seq, event)
        elif isinstance(event, FlowDispatched):
            self._apply_dispatched(event, env.event.at)
        elif isinstance(event, FlowDone):
            self._apply_done(event)
        elif isinstance(event, FlowFailed):
            self._apply_failed(event)
        elif isinstance(event, ConsentEvent):
            old = self.consents.get(event.domain, Consent(domain=event.domain))
            self.consents[event.domain] = evolve_consent(old, event, env.seq)

    def _apply_job(self, seq: int, event: JobEvent) -> None:
        plan = self.jobs.get(event.job_id)
        if plan is None:
            if not isinstance(event, JobCreated):
                return  # a job that ended (or never began) here: nothing to change
            plan = self.jobs[event.job_id] = JobPlan(job=Job(), created_seq=seq)
        elif isinstance(event, JobCreated):
            return  # the job exists: a second JobCreated never starts it over
        before = plan.job.status
        plan.job = evolve(plan.job, event, seq)
        if isinstance(event, JobStarted) and before != JobStatus.RUNNING and not plan.flows:
            self._plan_flows(plan)
        if plan.job.status in TERMINAL:
            self._forget(plan)

    def _plan_flows(self, plan: JobPlan) -> None:
        job = plan.job
        hosts = [(urlsplit(t.url).hostname or "").lower() for t in job.targets]
        most = max((t.flows for t in job.targets), default=0)
        # interleave targets so every target progresses from the start
        for n in range(most):
            for index, target in enumerate(job.targets):
                if n < target.flows:
                    fid = flow_id(job.job_id, index, n)
                    plan.flows[fid] = FlowSlot(fid, index, hosts[index])
                    plan.queue.append(fid)

    def _forget(self, plan: JobPlan) -> None:
        """A finished job leaves the state: planning and the snapshot only hold live jobs.

        Its late events then find no job and change nothing. Flows still in flight give
        their domain capacity back now: a runner drops the flows of a cancelled job
        without reporting them, so no later event would.
        """
        for slot in plan.flows.values():
            self._release(plan, slot)
        del self.jobs[plan.job.job_id]

    def _apply_dispatched(self, event: FlowDispatched, at: datetime) -> None:
        plan = self.jobs.get(event.job_id)
        slot = plan.flows.get(event.flow_id) if plan else None
        if plan is None or slot is None:
            return
        if slot.status != FlowStatus.PLANNED or event.attempt <= slot.attempt:
            return  # our own append seen again, or an older attempt
        slot.attempt = event.attempt
        slot.status = FlowStatus.IN_FLIGHT
        plan.in_flight += 1
        self.domain_in_flight[slot.host] += 1
        self._count_dispatch(slot.host, at)
        if plan.queue and plan.queue[0] == slot.flow_id:
            plan.queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                plan.queue.remove(slot.flow_id)

    def _count_dispatch(self, host: str, at: datetime) -> None:
        """Remember a dispatch for the host's flows-per-minute cap.

        Only dispatches within a window of the newest one can ever count again: older ones
        are not kept, so the window stays short while catching up on a long history, and
        holds at most a minute of dispatches however the log interleaves their times.
        """
        recent = self.domain_recent.get(host)
        if recent is None:
            recent = self.domain_recent[host] = deque()
        if not recent or at >= recent[-1]:
            recent.append(at)
        elif at > recent[-1] - RATE_WINDOW:
            bisect.insort(recent, at)  # another writer's clock was a little behind ours
        else:
            return
        while recent[0] <= recent[-1] - RATE_WINDOW:
            recent.popleft()

    def _release(self, plan: JobPlan, slot: FlowSlot) -> None:
        if slot.status == FlowStatus.IN_FLIGHT:
            plan.in_flight -= 1
            self.domain_in_flight[slot.host] -= 1

    def _apply_done(self, event: FlowDone) -> None:
        plan = self.jobs.get(event.job_id)
        slot = plan.flows.get(event.flow_id) if plan else None
        if plan is None or slot is None or slot.status == FlowStatus.DONE:
            return  # a retried flow may report twice: count the flow once
        if slot.status == FlowStatus.FAILED:
            plan.failed -= 1  # a late success from a redelivered attempt
        elif slot.status == FlowStatus.PLANNED:
            with contextlib.suppress(ValueError):
                plan.queue.remove(slot.flow_id)
        self._release(plan, slot)
        slot.status = FlowStatus.DONE
        plan.done += 1

    def _apply_failed(self, event: FlowFailed) -> None:
        plan = self.jobs.get(event.job_id)
        slot = plan.flows.get(event.flow_id) if plan else None
        if plan is None or slot is None or slot.status != FlowStatus.IN_FLIGHT:
            return
        if event.attempt != slot.attempt:
            return  # an older attempt failing late says nothing about the current one
        self._release(plan, slot)
        if event.retryable and slot.attempt < plan.job.settings.max_attempts:
            slot.status = FlowStatus.PLANNED
            plan.queue.appendleft(slot.flow_id)
        else:
            slot.status = FlowStatus.FAILED
            plan.failed += 1

    # -- planning ---------------------------------------------------------------------

    def authorised_hosts(self, now: datetime) -> frozenset[str]:
        return frozenset(d for d, c in self.consents.items() if c.valid_at(now))

    def plan(self, now: datetime, max_dispatches: int = 1000) -> list[Action]:
        """Everything due now: job transitions first, then the dispatches."""
        return [*self.due(), *self.dispatches(now, max_dispatches)]

    def due(self) -> list[JobAction]:
        """Jobs to start (or refuse) and jobs whose every flow is terminal."""
        actions: list[JobAction] = []
        for plan in self.jobs.values():
            status = plan.job.status
            if status == JobStatus.CREATED:
                actions.append(Start(plan.job.job_id))
            elif self.finishable(plan):
                actions.append(Finish(plan.job.job_id))
        return actions

    @staticmethod
    def finishable(plan: JobPlan) -> bool:
        return (
            plan.job.status in (JobStatus.RUNNING, JobStatus.PAUSED)
            and plan.terminal == plan.job.flows_total
            and plan.in_flight == 0
        )

    def dispatchable(self, d: Dispatch, now: datetime) -> bool:
        """Whether ``d`` still holds on the state as it is now (the log may have moved on)."""
        plan = self.jobs.get(d.job_id)
        if plan is None or plan.job.status != JobStatus.RUNNING:
            return False
        slot = plan.flows.get(d.flow_id)
        if slot is None or slot.status != FlowStatus.PLANNED or slot.attempt + 1 != d.attempt:
            return False
        consent = self.consents.get(slot.host)
        return consent is not None and consent.valid_at(now)

    def dispatches(self, now: datetime, max_dispatches: int = 1000) -> list[Dispatch]:
        authorised = self.authorised_hosts(now)
        runnable = [
            plan
            for plan in self.jobs.values()
            if plan.job.status == JobStatus.RUNNING and plan.queue
        ]
        runnable.sort(key=lambda p: (-p.job.settings.priority, p.created_seq))
        return self._fair_dispatches(runnable, now, authorised, max_dispatches)

    def _fair_dispatches(
        self, runnable: list[JobPlan], now: datetime, authorised: frozenset[str], budget: int
    ) -> list[Dispatch]:
        """Round-robin one flow per job per pass, within instance_count and domain caps."""
        out: list[Dispatch] = []
        in_flight = {p.job.job_id: p.in_flight for p in runnable}
        cursor = {p.job.job_id: 0 for p in runnable}
        domain_load = Counter(self.domain_in_flight)
        domain_rate: dict[str, int] = {}
        progressed = True
        while progressed and len(out) < budget:
            progressed = False
            for plan in runnable:
                job = plan.job
                jid = job.job_id
                if in_flight[jid] >= job.settings.instance_count or cursor[jid] >= len(plan.queue):
                    continue
                slot = plan.flows[plan.queue[cursor[jid]]]
                consent = self.consents.get(slot.host)
                if slot.host not in authorised or consent is None:
                    cursor[jid] += 1  # consent lapsed: hold this flow back
                    continue
                if domain_load[slot.host] >= consent.caps.max_concurrent:
                    continue
                if slot.host not in domain_rate:
                    domain_rate[slot.host] = self._recent(slot.host, now)
                if domain_rate[slot.host] >= consent.caps.max_flows_per_minute:
                    continue
                cursor[jid] += 1
                in_flight[jid] += 1
                domain_load[slot.host] += 1
                domain_rate[slot.host] += 1
                seed = flow_seed(job, slot.flow_id)
                out.append(Dispatch(jid, slot.flow_id, slot.attempt + 1, slot.target_index, seed))
                progressed = True
                if len(out) >= budget:
                    break
        return out

    def _recent(self, domain: str, now: datetime) -> int:
        recent = self.domain_recent.get(domain)
        if not recent:
            return 0
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        return len(recent)
