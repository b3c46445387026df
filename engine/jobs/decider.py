"""Job lifecycle as a pure decider: ``decide(job, cmd, meta) -> events``, ``evolve(job, event)``.

No clock, ids or I/O in here: ``Meta`` brings them in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from engine.errors import Conflict, Rejected
from engine.jobs.settings import check_settings
from schemas.device_catalogue import CatalogueVersion, DeviceCatalogue
from schemas.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobEvent,
    JobFailed,
    JobPaused,
    JobProgressed,
    JobRefused,
    JobResumed,
    JobStarted,
    TbEvent,
)
from schemas.licences import DEFAULT_PLAN, PLANS, Plan, refusal
from schemas.values import (
    TERMINAL_JOB_STATUSES,
    JobKind,
    JobSettings,
    JobStatus,
    Platform,
    Target,
    UsedVersion,
)

E = TypeVar("E", bound=JobEvent)

__all__ = ["TERMINAL", "JobStatus"]  # the statuses live in schemas.values, spelled once

TERMINAL = TERMINAL_JOB_STATUSES


@dataclass(frozen=True)
class Meta:
    id: str
    at: datetime
    actor: str


@dataclass(frozen=True)
class Job:
    job_id: str = ""
    status: JobStatus = JobStatus.NEW
    name: str = ""
    targets: tuple[Target, ...] = ()
    settings: JobSettings = JobSettings()
    platform: Platform = Platform()
    flows_total: int = 0
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    version: int = 0  # stream sequence of the last event applied (0 = none)
    created_seq: int = 0  # stream sequence of its JobCreated
    kind: JobKind = "flows"
    progress: int = 0  # percent an external job's worker reported
    creator: str = ""  # JobCreated's actor: whose plan the job runs on
    device_catalogue: CatalogueVersion | None = None  # its devices resolve against this

    @property
    def hosts(self) -> frozenset[str]:
        return target_hosts(self.targets)


def target_hosts(targets: tuple[Target, ...] | list[Target]) -> frozenset[str]:
    return frozenset((urlsplit(t.url).hostname or "").lower() for t in targets)


# -- commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """A job of flows is created, then started (or refused) by the engine; an external
    job has no targets and starts at once: its worker does the work, never a runner.

    ``device_catalogue``: the catalogue version in use, which the job records;
    ``catalogue``: its content, that the job's device names are checked against
    (``None``: this process does not ship it)."""

    job_id: str
    name: str
    targets: tuple[Target, ...]
    settings: JobSettings
    platform: Platform
    kind: JobKind = "flows"
    datasets: Mapping[str, UsedVersion] = field(default_factory=dict)
    device_catalogue: CatalogueVersion | None = None
    catalogue: DeviceCatalogue | None = None

    @property
    def recorded_catalogue(self) -> CatalogueVersion | None:
        return self.catalogue.ref if self.catalogue is not None else self.device_catalogue


@dataclass(frozen=True)
class StartJob:
    """Start if the creator's ``plan`` allows the job and every target host has valid
    consent, else refuse naming what the plan lacks or the hosts. ``running_jobs``: the
    creator's jobs that have started and not ended."""

    job_id: str
    authorised_hosts: frozenset[str]
    plan: Plan = PLANS[DEFAULT_PLAN]
    running_jobs: int = 0


@dataclass(frozen=True)
class PauseJob:
    job_id: str
    reason: str = ""


@dataclass(frozen=True)
class ResumeJob:
    """Resume only while every target host has valid consent (a revocation paused it)."""

    job_id: str
    authorised_hosts: frozenset[str]


@dataclass(frozen=True)
class CancelJob:
    job_id: str
    reason: str = ""


@dataclass(frozen=True)
class FinishJob:
    """Every flow is terminal: completed if any succeeded, failed if none did."""

    job_id: str
    flows_done: int
    flows_failed: int


@dataclass(frozen=True)
class AbortJob:
    """The engine cannot go on with this job (its events could not be read or applied, or
    planning it failed): end it, naming why. Refused if it never started, failed if it did.

    Decided without looking at the job's targets or settings: they may be what is wrong.
    """

    job_id: str
    reason: str
    flows_done: int = 0
    flows_failed: int = 0


@dataclass(frozen=True)
class ReportProgress:
    """An external job's worker said how far it got; the same percent again changes nothing."""

    job_id: str
    percent: int
    message: str = ""


@dataclass(frozen=True)
class EndExternalJob:
    """An external job's worker sent its summary: completed if it succeeded, else failed."""

    job_id: str
    succeeded: bool
    reason: str = ""


JobCommand = (
    CreateJob
    | StartJob
    | PauseJob
    | ResumeJob
    | CancelJob
    | FinishJob
    | AbortJob
    | ReportProgress
    | EndExternalJob
)
# commands that only make sense for one kind of job
FOR_KIND: dict[type, JobKind] = {
    StartJob: "flows",
    PauseJob: "flows",
    ResumeJob: "flows",
    FinishJob: "flows",
    ReportProgress: "external",
    EndExternalJob: "external",
}

ALLOWED: dict[type, frozenset[JobStatus]] = {
    CreateJob: frozenset({JobStatus.NEW}),
    StartJob: frozenset({JobStatus.CREATED}),
    PauseJob: frozenset({JobStatus.RUNNING}),
    ResumeJob: frozenset({JobStatus.PAUSED}),
    CancelJob: frozenset({JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED}),
    FinishJob: frozenset({JobStatus.RUNNING, JobStatus.PAUSED}),
    # NEW: a job whose JobCreated was quarantined still has a subject to end it on
    AbortJob: frozenset({JobStatus.NEW, JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED}),
    ReportProgress: frozenset({JobStatus.RUNNING, JobStatus.PAUSED}),
    EndExternalJob: frozenset({JobStatus.RUNNING, JobStatus.PAUSED}),
}
REASON_LENGTH = 1000


def decide(job: Job, cmd: JobCommand, meta: Meta) -> list[TbEvent]:
    if job.status not in ALLOWED[type(cmd)]:
        if isinstance(cmd, CreateJob):
            raise Conflict("job_id", f"job {cmd.job_id} already exists ({job.status.value})")
        verb = _verb(cmd)
        raise Conflict("status", f"cannot {verb} a job that is {job.status.value}")
    only = FOR_KIND.get(type(cmd))
    if only is not None and job.kind != only:
        verb = _verb(cmd)
        raise Conflict("kind", f"cannot {verb} a job of kind {job.kind!r} (only {only!r})")
    job_id = cmd.job_id
    match cmd:
        case CreateJob(name=name, targets=targets, settings=settings, platform=platform, kind=kind):
            if kind == "external" and targets:
                raise Rejected("targets", "an external job has none: its worker does the work")
            if kind == "flows":
                if not targets:
                    raise Rejected("targets", "at least one target is required")
                check_settings(
                    settings,
                    target_hosts(targets),
                    cmd.catalogue,
                    platform,
                    cmd.recorded_catalogue,
                )
            created = JobCreated(
                id=meta.id,
                at=meta.at,
                actor=meta.actor,
                job_id=job_id,
                name=name,
                targets=list(targets),
                settings=settings,
                platform=platform,
                kind=kind,
                datasets=dict(cmd.datasets),
                device_catalogue=cmd.recorded_catalogue,
            )
            if kind == "external":  # its worker is already at work: no runner, no consent
                return [created, _emit(JobStarted, meta, job_id, flows_total=0, allowed_hosts=[])]
            return [created]
        case ReportProgress(percent=percent, message=message):
            if not 0 <= percent <= 100:
                raise Rejected("percent", f"must be 0-100 (got {percent})")
            if percent == job.progress:
                return []
            return [_emit(JobProgressed, meta, job_id, percent=percent, message=message[:4096])]
        case EndExternalJob(succeeded=True):
            return [_emit(JobCompleted, meta, job_id, flows_done=0, flows_failed=0)]
        case EndExternalJob(reason=reason):
            return [_emit(JobFailed, meta, job_id, reason=reason[:REASON_LENGTH] or "failed")]
        case StartJob(authorised_hosts=authorised, plan=plan, running_jobs=running):
            refused = refusal(plan, job.settings, job.targets, running_jobs=running, kind=job.kind)
            if refused is not None:
                return [_emit(JobRefused, meta, job_id, reason=refused.reason)]
            missing = sorted(job.hosts - authorised)
            if missing:
                reason = f"no verified consent for host(s): {', '.join(missing)}"
                return [_emit(JobRefused, meta, job_id, reason=reason, hosts=missing)]
            total = sum(t.flows for t in job.targets)
            hosts = sorted(job.hosts)
            return [_emit(JobStarted, meta, job_id, flows_total=total, allowed_hosts=hosts)]
        case PauseJob(reason=reason):
            return [_emit(JobPaused, meta, job_id, reason=reason)]
        case ResumeJob(authorised_hosts=authorised):
            missing = sorted(job.hosts - authorised)
            if missing:
                named = ", ".join(missing)
                raise Conflict("consent", f"cannot resume: no verified consent for {named}")
            return [_emit(JobResumed, meta, job_id)]
        case CancelJob(reason=reason):
            return [_emit(JobCancelled, meta, job_id, reason=reason)]
        case FinishJob(flows_done=done, flows_failed=failed):
            if done < 0 or failed < 0 or done + failed != job.flows_total:
                raise Rejected(
                    "flows", f"done {done} + failed {failed} must equal {job.flows_total}"
                )
            counts = {"flows_done": done, "flows_failed": failed}
            if done == 0:
                return [_emit(JobFailed, meta, job_id, reason="every flow failed", **counts)]
            return [_emit(JobCompleted, meta, job_id, **counts)]
        case AbortJob(reason=reason, flows_done=done, flows_failed=failed):
            reason = reason[:REASON_LENGTH]
            if job.status in (JobStatus.NEW, JobStatus.CREATED):
                return [_emit(JobRefused, meta, job_id, reason=reason)]
            # as far as the job got: never more than it planned
            done = min(max(done, 0), job.flows_total)
            failed = min(max(failed, 0), job.flows_total - done)
            counts = {"flows_done": done, "flows_failed": failed}
            return [_emit(JobFailed, meta, job_id, reason=reason, **counts)]
    raise AssertionError(f"unhandled command {cmd!r}")


def _verb(cmd: JobCommand) -> str:
    if isinstance(cmd, ReportProgress):
        return "report progress of"
    if isinstance(cmd, EndExternalJob):
        return "end"
    return type(cmd).__name__.removesuffix("Job").lower()


def _emit(kind: type[E], meta: Meta, job_id: str, **fields: Any) -> E:
    return kind(id=meta.id, at=meta.at, actor=meta.actor, job_id=job_id, **fields)


STATUS_AFTER: dict[type, JobStatus] = {
    JobCreated: JobStatus.CREATED,
    JobRefused: JobStatus.REFUSED,
    JobStarted: JobStatus.RUNNING,
    JobPaused: JobStatus.PAUSED,
    JobResumed: JobStatus.RUNNING,
    JobCancelled: JobStatus.CANCELLED,
    JobCompleted: JobStatus.COMPLETED,
    JobFailed: JobStatus.FAILED,
}


def evolve(job: Job, event: Event, seq: int = 0) -> Job:
    """Fold one event in; a terminal job stays terminal whatever arrives after."""
    if not isinstance(event, JobEvent):
        return job
    version = max(job.version, seq)
    if job.status in TERMINAL:
        return replace(job, version=version)
    match event:
        case JobCreated() if job.status != JobStatus.NEW:
            return replace(job, version=version)  # a job is created once
        case JobCreated():
            job = replace(
                job,
                job_id=event.job_id,
                name=event.name,
                targets=tuple(event.targets),
                settings=event.settings,
                platform=event.platform,
                flows_total=sum(t.flows for t in event.targets),
                created_seq=seq,
                kind=event.kind,
                creator=event.actor,
                device_catalogue=event.device_catalogue,
            )
        case JobProgressed():
            job = replace(job, progress=event.percent)
        case JobStarted():
            job = replace(
                job, flows_total=event.flows_total, allowed_hosts=frozenset(event.allowed_hosts)
            )
    status = STATUS_AFTER.get(type(event), job.status)
    return replace(job, status=status, version=version)


def fold(events: list[tuple[int, Event]]) -> Job:
    job = Job()
    for seq, event in events:
        job = evolve(job, event, seq)
    return job
