"""The dispatcher's view of the log and its pure planning step.

``DispatchState.apply`` folds events in (idempotently: the dispatcher applies its
own appends at once and sees them again from the stream); ``due`` and ``dispatches``
decide what to append next from the state and the time, doing no I/O.

Only live jobs are held: a job leaves the state when it ends, so planning and the
snapshot cost what the live jobs cost, however long the history. Only a JobCreated
(or a quarantined one, to refuse it) brings a job in; any other event of a job the
state does not hold changes nothing.

What a flow's events mean is ``schemas.flow_lifecycle``, the rule the read model
applies too; the dispatcher reads FlowDispatched, FlowDone, FlowFailed, FlowStalled and
FlowReleased, never FlowStarted (it changes no count).

Each job is a lane: an exception while applying or planning one job's events marks
that job broken (``JobPlan.broken``, the error kept in ``errors`` for the loop to
log) and the job is ended with the reason; every other job goes on.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from engine.jobs.decider import STATUS_AFTER, TERMINAL, Job, JobStatus, StartJob, evolve
from engine.proxies.pool import candidates
from schemas import subjects
from schemas.consent_state import Consent, evolve_consent, governing
from schemas.events import (
    ConsentEvent,
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    JobCreated,
    JobEvent,
    JobStarted,
    LicenseAssigned,
    ProxyEvent,
    TbEvent,
)
from schemas.flow_lifecycle import IN_FLIGHT, WAITING, FlowState, flow_transition
from schemas.licences import DEFAULT_PLAN, Plan, plan_named
from schemas.proxy_state import ProxyState, fold_into

RATE_WINDOW = timedelta(minutes=1)
STALL_MARGIN = timedelta(minutes=10)  # beyond a flow's planned session, before it is stalled

FlowOutcome = FlowDone | FlowFailed | FlowStalled | FlowReleased
FLOW_INPUTS = (FlowDispatched, FlowDone, FlowFailed, FlowStalled, FlowReleased)


class FlowStatus(StrEnum):
    """What a flow's lifecycle state means for planning."""

    PLANNED = "planned"  # never dispatched, or waiting to be dispatched again
    IN_FLIGHT = "in_flight"
    DONE = "done"
    FAILED = "failed"


_PLANNING: dict[str, FlowStatus] = {
    **dict.fromkeys(WAITING, FlowStatus.PLANNED),
    **dict.fromkeys(IN_FLIGHT, FlowStatus.IN_FLIGHT),
    "done": FlowStatus.DONE,
    "failed": FlowStatus.FAILED,
}


def planning_status(flow: FlowState | None) -> FlowStatus:
    return FlowStatus.PLANNED if flow is None else _PLANNING[flow.status]


@dataclass
class FlowSlot:
    flow_id: str
    target_index: int
    host: str
    flow: FlowState | None = None  # None: never dispatched
    dispatched_at: datetime | None = None  # FlowDispatched.at of the latest attempt
    item_seq: int = 0  # the stream sequence of the latest attempt's work item
    # when the dispatcher first saw that work item delivered to a runner (``None``: still
    # waiting in its platform's queue, or not looked at yet): its stall clock starts there
    delivered_at: datetime | None = None

    @property
    def status(self) -> FlowStatus:
        return planning_status(self.flow)

    @property
    def attempt(self) -> int:
        return self.flow.attempt if self.flow is not None else 0


@dataclass
class JobPlan:
    job: Job
    created_seq: int
    hosts: tuple[str, ...] = ()  # each target's host, by target index
    flows: dict[str, FlowSlot] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)  # planned flow ids, retries first
    flying: dict[str, None] = field(default_factory=dict)  # in-flight flow ids, oldest first
    done: int = 0
    failed: int = 0
    broken: str = ""  # why the engine cannot go on with this job ("" = it can)

    @property
    def in_flight(self) -> int:
        return len(self.flying)

    @property
    def terminal(self) -> int:
        return self.done + self.failed

    @property
    def host_set(self) -> frozenset[str]:
        return frozenset(self.hosts)


def flow_id(job_id: str, target_index: int, n: int) -> str:
    return f"{job_id}_{target_index}_{n}"


def flow_seed(job: Job, flow: str) -> int:
    """``seed(job, flow)``: a flow's random choices replay the same way. With the job's
    seed set, the flow's index in its job goes in, not its id (which names the job): a
    new job with that seed replays the same choices flow by flow."""
    index = flow.removeprefix(f"{job.job_id}_")
    base = job.settings.seed if job.settings.seed is not None else job.job_id
    digest = hashlib.blake2b(f"{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def flow_turn(fid: str, targets: int, attempt: int) -> int:
    """Where a flow (and attempt) comes in its job's order of flows: the rotation of its
    proxy candidates under proxy switching."""
    _, index, n = fid.rsplit("_", 2)
    return int(n) * max(targets, 1) + int(index) + attempt - 1


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


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
class Abort:
    """The job is broken (``JobPlan.broken``): end it with that reason."""

    job_id: str


@dataclass(frozen=True)
class PauseRevoked:
    """A running job has a target on a host whose consent was revoked."""

    job_id: str
    host: str


@dataclass(frozen=True)
class FailRevoked:
    """An in-flight flow on a host whose consent was revoked: it ends, not retried."""

    job_id: str
    flow_id: str
    attempt: int


@dataclass(frozen=True)
class Stall:
    """An in-flight attempt whose end did not arrive by its session plus the margin."""

    job_id: str
    flow_id: str
    attempt: int


@dataclass(frozen=True)
class Dispatch:
    job_id: str
    flow_id: str
    attempt: int
    target_index: int
    seed: int


JobAction = Abort | Start | FailRevoked | PauseRevoked | Stall | Finish
Action = JobAction | Dispatch


@dataclass(frozen=True)
class LaneError:
    """A job that broke, for the loop to log once with its traceback."""

    job_id: str
    reason: str
    error: Exception


@dataclass
class DispatchState:
    jobs: dict[str, JobPlan] = field(default_factory=dict)
    consents: dict[str, Consent] = field(default_factory=dict)
    domain_in_flight: Counter[str] = field(default_factory=Counter)
    domain_recent: dict[str, deque[datetime]] = field(default_factory=dict)
    proxies: dict[str, ProxyState] = field(default_factory=dict)  # registered, not retired
    plans: dict[str, str] = field(default_factory=dict)  # user id -> plan last assigned
    # external jobs started and not ended, by id -> creator: never planned here, they
    # count towards their creator's concurrent jobs all the same
    external_jobs: dict[str, str] = field(default_factory=dict)
    position: int = 0
    errors: list[LaneError] = field(default_factory=list)  # not checkpointed: logged once
    # attempts this process ended (stalled, revoked) whose event the reader has not
    # brought yet: an outcome is folded in log order (the first one stands), so the
    # dispatcher's own waits for the reader like any other; meanwhile it is not planned
    # again. Not checkpointed: planned again after a restart, it dedupes on its msg-id.
    ending: set[tuple[str, int]] = field(default_factory=set)

    # -- folding events in ----------------------------------------------------------

    def apply(self, env: Envelope) -> None:
        if env.seq > self.position:
            self.position = env.seq
        self.apply_event(env.seq, env.event)

    def apply_event(self, seq: int, event: TbEvent) -> None:
        """Fold one event stored at ``seq`` in, leaving ``position`` alone."""
        if isinstance(event, FLOW_INPUTS):
            self._apply_flow(seq, event)
        elif isinstance(event, JobEvent):
            self._apply_job(seq, event)
        elif isinstance(event, ConsentEvent):
            self._apply_consent(seq, event)
        elif isinstance(event, ProxyEvent):
            fold_into(self.proxies, event, seq)
        elif isinstance(event, LicenseAssigned):
            self.plans[event.user_id] = event.plan

    def unreadable(self, job_id: str, seq: int, kind: str, reason: str, first: bool) -> None:
        """A message on the job's subjects that is no event (it was quarantined).

        It still moved the job's last subject sequence, which the next append of the job
        must expect. A JobCreated that was the job's ``first`` message makes a job that
        cannot run: it is refused, naming what was wrong.
        """
        self.position = max(self.position, seq)
        plan = self.jobs.get(job_id)
        if plan is not None:
            plan.job = replace(plan.job, version=max(plan.job.version, seq))
        elif kind == JobCreated.__name__ and first:
            plan = self.jobs[job_id] = JobPlan(Job(job_id=job_id, version=seq), created_seq=seq)
            plan.broken = f"JobCreated could not be read: {reason}"

    def _apply_job(self, seq: int, event: JobEvent) -> None:
        plan = self.jobs.get(event.job_id)
        if plan is None:
            self._track_external(event)
            if not isinstance(event, JobCreated) or event.kind != "flows":
                # a job that ended (or never began) here, or an external one (its
                # worker does the work): nothing to plan
                return
            job = Job(job_id=event.job_id, version=seq)
            plan = self.jobs[event.job_id] = JobPlan(job=job, created_seq=seq)
        elif isinstance(event, JobCreated):
            plan.job = replace(plan.job, version=max(plan.job.version, seq))
            return  # the job exists: a second JobCreated never starts it over
        with self._lane(plan, event, seq):
            before = plan.job.status
            plan.job = evolve(plan.job, event, seq)
            if isinstance(event, JobCreated):
                plan.hosts = tuple(host_of(t.url) for t in plan.job.targets)
            if isinstance(event, JobStarted) and before != JobStatus.RUNNING and not plan.flows:
                self._plan_flows(plan)
        if plan.job.status in TERMINAL:
            self._forget(plan)

    def _track_external(self, event: JobEvent) -> None:
        if isinstance(event, JobCreated):
            if event.kind == "external":  # its JobStarted is stored with it
                self.external_jobs[event.job_id] = event.actor
        elif STATUS_AFTER.get(type(event)) in TERMINAL:
            self.external_jobs.pop(event.job_id, None)

    def _plan_flows(self, plan: JobPlan) -> None:
        job = plan.job
        most = max((t.flows for t in job.targets), default=0)
        # interleave targets so every target progresses from the start
        for n in range(most):
            for index, target in enumerate(job.targets):
                if n < target.flows:
                    fid = flow_id(job.job_id, index, n)
                    plan.flows[fid] = FlowSlot(fid, index, plan.hosts[index])
                    plan.queue.append(fid)

    def drop(self, job_id: str) -> None:
        """Stop planning for a job the engine could not even end (the last resort)."""
        plan = self.jobs.get(job_id)
        if plan is not None:
            self._forget(plan)

    def _forget(self, plan: JobPlan) -> None:
        """A finished job leaves the state: planning and the snapshot only hold live jobs.

        Its late events then find no job and change nothing. Flows still in flight give
        their domain capacity back now: a runner drops the flows of a cancelled job
        without reporting them, so no later event would.
        """
        for fid in plan.flying:
            slot = plan.flows[fid]
            self.domain_in_flight[slot.host] -= 1
            self.ending.discard((fid, slot.attempt))
        del self.jobs[plan.job.job_id]

    def _apply_flow(self, seq: int, event: FlowDispatched | FlowOutcome) -> None:
        plan = self.jobs.get(event.job_id)
        slot = plan.flows.get(event.flow_id) if plan else None
        if plan is None or slot is None:
            return  # not a flow of a live job
        try:  # the job's lane (inline: this runs for every flow event)
            self._fold_flow(plan, slot, event, seq)
        except Exception as err:
            self._broke_applying(plan, event, seq, err)

    def _fold_flow(
        self, plan: JobPlan, slot: FlowSlot, event: FlowDispatched | FlowOutcome, seq: int
    ) -> None:
        old = slot.flow
        step = flow_transition(old, event, max_attempts=plan.job.settings.max_attempts)
        new = step.state
        if new == old:
            return  # seen again, stale, or after the first outcome
        assert new is not None  # an event never takes a flow back to never dispatched
        slot.flow = new
        planned, flying = FlowStatus.PLANNED, FlowStatus.IN_FLIGHT
        before = planned if old is None else _PLANNING[old.status]
        after = _PLANNING[new.status]
        old_attempt = 0 if old is None else old.attempt
        new_attempt = new.attempt != old_attempt
        plan.done += step.done
        plan.failed += step.failed
        fid = slot.flow_id
        if before is planned and after is not planned:
            self._unqueue(plan, fid)
        if before is flying and (after is not flying or new_attempt):
            del plan.flying[fid]
            self.domain_in_flight[slot.host] -= 1
            if self.ending:
                self.ending.discard((fid, old_attempt))
        if after is flying and (before is not flying or new_attempt):
            plan.flying[fid] = None
            self.domain_in_flight[slot.host] += 1
            slot.dispatched_at, slot.item_seq, slot.delivered_at = event.at, seq, None
            self._count_dispatch(slot.host, event.at)
        if after is planned and before is not planned:
            plan.queue.appendleft(fid)  # retries and releases go first

    @staticmethod
    def _unqueue(plan: JobPlan, fid: str) -> None:
        if plan.queue and plan.queue[0] == fid:
            plan.queue.popleft()
        elif fid in plan.queue:
            plan.queue.remove(fid)

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

    def _apply_consent(self, seq: int, event: ConsentEvent) -> None:
        domain = event.domain.lower()
        old = self.consents.get(domain, Consent(domain=domain))
        try:
            self.consents[domain] = evolve_consent(old, event, seq)
        except Exception as err:
            # fail closed: a consent that cannot be read authorises nothing
            self.consents[domain] = Consent(domain=domain, version=seq)
            self.errors.append(LaneError(f"consent:{domain}", f"consent unreadable: {err!r}", err))

    def proxy_candidates(self, plan: JobPlan, fid: str, attempt: int) -> list[str] | None:
        """The proxy ids a flow's work item names, in the order to try them; ``None`` when
        its job draws on a pool in which no proxy is usable now (the flow waits)."""
        settings = plan.job.settings
        if settings.proxies is None:
            return []
        turn = flow_turn(fid, len(plan.job.targets), attempt)
        found = candidates(settings.proxies, self.proxies, settings.proxy_switching, turn)
        return found or None

    @contextmanager
    def _lane(self, plan: JobPlan, event: object, seq: int) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            self._broke_applying(plan, event, seq, err)

    def _broke_applying(self, plan: JobPlan, event: object, seq: int, err: Exception) -> None:
        plan.job = replace(plan.job, version=max(plan.job.version, seq))
        self.break_job(plan, f"applying {type(event).__name__} failed: {err!r}", err)

    def break_job(self, plan: JobPlan, reason: str, err: Exception) -> None:
        """The engine cannot go on with this job: plan nothing more for it but its end."""
        if not plan.broken:
            plan.broken = reason
            self.errors.append(LaneError(plan.job.job_id, reason, err))

    # -- licences ---------------------------------------------------------------------

    def plan_of(self, user_id: str) -> Plan:
        return plan_named(self.plans.get(user_id, DEFAULT_PLAN))

    def start_command(self, plan: JobPlan, now: datetime) -> StartJob:
        """Start ``plan``'s job on what holds now: the hosts with valid consent, and its
        creator's plan with the jobs they already run (the log's, whatever the API saw)."""
        creator = plan.job.creator
        return StartJob(
            plan.job.job_id,
            self.authorised_hosts(now),
            plan=self.plan_of(creator),
            running_jobs=self.running_jobs(creator),
        )

    def running_jobs(self, user_id: str) -> int:
        """The user's jobs that have started and not ended, external ones included."""
        started = (JobStatus.RUNNING, JobStatus.PAUSED)
        flows = sum(
            1 for p in self.jobs.values() if p.job.creator == user_id and p.job.status in started
        )
        return flows + sum(1 for creator in self.external_jobs.values() if creator == user_id)

    # -- planning ---------------------------------------------------------------------

    def consent_of(self, host: str) -> Consent | None:
        """The consent that governs ``host``: its own, or a parent's covering subdomains."""
        return governing(self.consents, host)

    def _job_hosts(self) -> set[str]:
        hosts: set[str] = set()
        for plan in self.jobs.values():
            hosts.update(plan.hosts)
        return hosts

    def authorised_hosts(self, now: datetime) -> frozenset[str]:
        """The consented domains and the hosts of live jobs that a valid consent governs."""
        valid = {d for d, c in self.consents.items() if c.valid_at(now)}
        for host in self._job_hosts() - valid:
            consent = self.consent_of(host)
            if consent is not None and consent.valid_at(now):
                valid.add(host)
        return frozenset(valid)

    def lapsed(self, host: str, now: datetime) -> bool:
        """Whether no valid consent governs ``host`` now: revoked, expired, or no longer
        covered. A job only starts with valid consent for its hosts, so for the host of a
        running job this means it was taken back."""
        consent = self.consent_of(host)
        return consent is None or not consent.valid_at(now)

    def revoked_hosts(self, now: datetime) -> frozenset[str]:
        """The hosts of live jobs without valid consent now: the flows in flight there
        end and the running jobs pause."""
        return frozenset(host for host in self._job_hosts() if self.lapsed(host, now))

    def cap_scope(self, host: str) -> tuple[str, Consent | None]:
        """Whose caps a flow on ``host`` counts against: its governing consent's domain
        (a subdomain covered by its parent shares the parent's caps)."""
        consent = self.consent_of(host)
        return (consent.domain if consent is not None else host), consent

    def plan(
        self, now: datetime, max_dispatches: int = 1000, stall_margin: timedelta = STALL_MARGIN
    ) -> list[Action]:
        """Everything due now: job transitions and flow ends first, then the dispatches."""
        return [*self.due(now, stall_margin), *self.dispatches(now, max_dispatches)]

    def due(self, now: datetime, stall_margin: timedelta = STALL_MARGIN) -> list[JobAction]:
        """Broken jobs to end, jobs to start, revocations and stalls to record, jobs to finish."""
        actions: list[JobAction] = []
        revoked = self.revoked_hosts(now)
        for plan in list(self.jobs.values()):
            found: list[JobAction] = []
            try:
                self._due(plan, now, stall_margin, revoked, found)
            except Exception as err:
                self.break_job(plan, f"planning failed: {err!r}", err)
                found = [Abort(plan.job.job_id)]
            actions.extend(found)
        return actions

    def _due(
        self,
        plan: JobPlan,
        now: datetime,
        margin: timedelta,
        revoked: frozenset[str],
        out: list[JobAction],
    ) -> None:
        job = plan.job
        if plan.broken:
            out.append(Abort(job.job_id))
        elif job.status == JobStatus.CREATED:
            out.append(Start(job.job_id))
        elif job.status in (JobStatus.RUNNING, JobStatus.PAUSED):
            on_revoked = revoked.intersection(plan.hosts) if revoked else None
            if on_revoked:
                for fid in plan.flying:
                    slot = plan.flows[fid]
                    if slot.host in on_revoked and (fid, slot.attempt) not in self.ending:
                        out.append(FailRevoked(job.job_id, fid, slot.attempt))
                if job.status == JobStatus.RUNNING:
                    out.append(PauseRevoked(job.job_id, min(on_revoked)))
            if plan.flying:
                self._stalls(plan, now, margin, out)
            elif plan.terminal == job.flows_total:
                out.append(Finish(job.job_id))

    def _stalls(
        self, plan: JobPlan, now: datetime, margin: timedelta, out: list[JobAction]
    ) -> None:
        session = timedelta(seconds=plan.job.settings.longest_flow_seconds)
        # oldest first: stop at the first one still within time, or not yet delivered (a
        # platform's queue delivers in stream order, so the ones after it wait too)
        for fid in plan.flying:
            slot = plan.flows[fid]
            if slot.delivered_at is None or slot.delivered_at + session + margin > now:
                return
            if (fid, slot.attempt) not in self.ending:
                out.append(Stall(plan.job.job_id, fid, slot.attempt))

    def stalled(self, action: Stall, now: datetime, margin: timedelta) -> float | None:
        """Seconds the attempt has waited since its dispatch, if ``action`` still holds now;
        else ``None``."""
        slot = self.in_flight_slot(action.job_id, action.flow_id, action.attempt)
        if slot is None or slot.delivered_at is None or slot.dispatched_at is None:
            return None
        plan = self.jobs[action.job_id]
        session = timedelta(seconds=plan.job.settings.longest_flow_seconds)
        if slot.delivered_at + session + margin > now:
            return None
        return (now - slot.dispatched_at).total_seconds()

    # -- deliveries -------------------------------------------------------------------
    #
    # A work item waits in its platform's queue until a runner has a free slot, which
    # may take longer than any session when a job's instance count exceeds the fleet's
    # slots. Waiting is not being stuck: an item's stall clock starts when the dispatcher
    # sees its platform's consumer deliver it (the consumer says up to which stream
    # sequence it has delivered; first deliveries follow stream order), not at dispatch.

    def awaiting_delivery(self) -> set[str]:
        """The dispatch consumers that hold in-flight work items not yet seen delivered."""
        consumers: set[str] = set()
        for plan in self.jobs.values():
            for fid in plan.flying:
                if plan.flows[fid].delivered_at is None:
                    platform = plan.job.platform
                    consumers.add(subjects.dispatch_consumer(platform.os, platform.browser))
                    break
        return consumers

    def delivered(self, consumer: str, up_to: int, now: datetime) -> None:
        """``consumer`` has delivered every work item up to stream sequence ``up_to``, as
        seen at ``now``: the stall clocks of those newly seen delivered start at ``now``."""
        for plan in self.jobs.values():
            platform = plan.job.platform
            if subjects.dispatch_consumer(platform.os, platform.browser) != consumer:
                continue
            for fid in plan.flying:
                slot = plan.flows[fid]
                if slot.delivered_at is None and slot.item_seq <= up_to:
                    slot.delivered_at = now

    def in_flight_slot(self, job_id: str, fid: str, attempt: int) -> FlowSlot | None:
        """The flow's slot if that attempt is in flight and nothing has ended it here yet."""
        plan = self.jobs.get(job_id)
        slot = plan.flows.get(fid) if plan is not None else None
        if slot is None or slot.status != FlowStatus.IN_FLIGHT or slot.attempt != attempt:
            return None
        return None if (fid, attempt) in self.ending else slot

    @staticmethod
    def finishable(plan: JobPlan) -> bool:
        return (
            not plan.broken
            and plan.job.status in (JobStatus.RUNNING, JobStatus.PAUSED)
            and plan.terminal == plan.job.flows_total
            and plan.in_flight == 0
        )

    def dispatchable(
        self, d: Dispatch, now: datetime, authorised: frozenset[str] | None = None
    ) -> bool:
        """Whether ``d`` still holds on the state as it is now (the log may have moved on);
        ``authorised``: ``authorised_hosts(now)``, when the caller has it already."""
        plan = self.jobs.get(d.job_id)
        if plan is None or plan.broken or plan.job.status != JobStatus.RUNNING:
            return False
        slot = plan.flows.get(d.flow_id)
        if slot is None or slot.status != FlowStatus.PLANNED or slot.attempt + 1 != d.attempt:
            return False
        if authorised is None:
            authorised = self.authorised_hosts(now)
        if slot.host not in authorised:
            return False
        return self.proxy_candidates(plan, d.flow_id, d.attempt) is not None

    def dispatches(self, now: datetime, max_dispatches: int = 1000) -> list[Dispatch]:
        authorised = self.authorised_hosts(now)
        runnable = [
            plan
            for plan in self.jobs.values()
            if plan.job.status == JobStatus.RUNNING and plan.queue and not plan.broken
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
        # in flight and dispatched in the last minute, per cap scope, across every job
        domain_load: Counter[str] = Counter()
        for host, n in self.domain_in_flight.items():
            if n:
                domain_load[self.cap_scope(host)[0]] += n
        domain_rate: dict[str, int] = {}
        progressed = True
        while progressed and len(out) < budget:
            progressed = False
            for plan in runnable:
                if plan.broken:
                    continue
                try:
                    picked = self._pick(plan, now, authorised, in_flight, cursor, domain_load,
                                        domain_rate)  # fmt: skip
                except Exception as err:
                    self.break_job(plan, f"planning failed: {err!r}", err)
                    continue
                if picked is None:
                    continue
                out.append(picked)
                progressed = True
                if len(out) >= budget:
                    break
        return [d for d in out if not self.jobs[d.job_id].broken]

    def _pick(
        self,
        plan: JobPlan,
        now: datetime,
        authorised: frozenset[str],
        in_flight: dict[str, int],
        cursor: dict[str, int],
        domain_load: Counter[str],
        domain_rate: dict[str, int],
    ) -> Dispatch | None:
        job = plan.job
        jid = job.job_id
        if in_flight[jid] >= job.settings.instance_count or cursor[jid] >= len(plan.queue):
            return None
        slot = plan.flows[plan.queue[cursor[jid]]]
        scope, consent = self.cap_scope(slot.host)
        if slot.host not in authorised or consent is None:
            cursor[jid] += 1  # consent lapsed: hold this flow back
            return None
        if domain_load[scope] >= consent.caps.max_concurrent:
            return None
        if scope not in domain_rate:
            domain_rate[scope] = self._recent_in_scope(scope, now)
        if domain_rate[scope] >= consent.caps.max_flows_per_minute:
            return None
        if self.proxy_candidates(plan, slot.flow_id, slot.attempt + 1) is None:
            return None  # no usable proxy in the job's pool: its flows wait for one
        cursor[jid] += 1
        in_flight[jid] += 1
        domain_load[scope] += 1
        domain_rate[scope] += 1
        seed = flow_seed(job, slot.flow_id)
        return Dispatch(jid, slot.flow_id, slot.attempt + 1, slot.target_index, seed)

    def _recent_in_scope(self, scope: str, now: datetime) -> int:
        """Dispatches in the last minute to every host whose caps are ``scope``'s."""
        return sum(
            self._recent(host, now)
            for host in list(self.domain_recent)
            if host == scope or self.cap_scope(host)[0] == scope
        )

    def _recent(self, domain: str, now: datetime) -> int:
        recent = self.domain_recent.get(domain)
        if not recent:
            return 0
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        return len(recent)
