"""The messages of live updates (WebSocket ``/ws`` and SSE), each a JSON object whose
``type`` names it, and the messages a WebSocket client may send.

Every message read from the read model carries ``seq``: the read model's checkpoint at
the moment its numbers were read, so ``GET …?min_seq=<seq>`` answers at least as far.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec

from projections.proxies import ProxyView
from projections.queries import JobView, RunnerView, TargetView
from schemas.values import JobStatus

M = TypeVar("M", bound=msgspec.Struct)

MAX_SUBSCRIBED_JOBS = 1000
JobId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")]


class TargetProgress(msgspec.Struct):
    """One target's row: ``flow_done/flow_target``, ``click_done/click_target``."""

    url: str
    flow_done: int
    flow_target: int
    click_done: int
    click_target: int
    idx: int = 0
    flow_failed: int = 0


class ProgressUpdate(msgspec.Struct, kw_only=True, tag="progressUpdate", tag_field="type"):
    """A job's counts; ``rate`` is flows finished (done or failed) per minute since the
    job started, ``eta_seconds`` the time the rest take at that rate (running jobs only)."""

    job_id: str
    status: JobStatus
    total: int
    success: int
    fail: int
    eta_seconds: float | None
    rate: float | None
    targets: list[TargetProgress]
    seq: int


class FlowDoneUpdate(msgspec.Struct, kw_only=True, tag="flowDoneUpdate", tag_field="type"):
    """A target's flows finished: ``flow_done`` (and ``flow_failed``) of ``flow_target``."""

    job_id: str
    idx: int
    url: str
    flow_done: int
    flow_failed: int
    flow_target: int
    seq: int


class ClickDoneUpdate(msgspec.Struct, kw_only=True, tag="clickDoneUpdate", tag_field="type"):
    """A target's clicks done: ``click_done`` of ``click_target``."""

    job_id: str
    idx: int
    url: str
    click_done: int
    click_target: int
    seq: int


class JobInfo(msgspec.Struct, kw_only=True, tag="jobInfo", tag_field="type", omit_defaults=True):
    """A job's status changed (created, started, paused, resumed, ended): what it runs on
    and how, with the reason a refused, failed or cancelled job gave."""

    job_id: str
    name: str
    status: JobStatus
    reason: str | None = None
    approval: str | None = None
    platform_os: str
    platform_browser: str
    instance_count: int
    flows_total: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seq: int


class RunnerUpdate(msgspec.Struct, kw_only=True, tag="runnerUpdate", tag_field="type"):
    """A runner's row changed: registered, draining, deregistered, or a flow run it
    reported (its ``flows_completed``/``flows_failed``)."""

    runner_id: str
    runner: RunnerView
    seq: int


class ProxyUpdate(msgspec.Struct, kw_only=True, tag="proxyUpdate", tag_field="type"):
    """A proxy's health changed (registered, failed, marked bad, checked, restored, retired)."""

    proxy_id: str
    proxy: ProxyView
    seq: int = 0


class Subscribed(msgspec.Struct, kw_only=True, tag="subscribed", tag_field="type"):
    """The answer to ``subscribe``/``unsubscribe``: what this client receives now.
    ``unknown``: jobs of the request the read model does not hold (yet)."""

    jobs: list[str]
    runners: bool
    proxies: bool
    unknown: list[str] = msgspec.field(default_factory=list)


class LiveError(msgspec.Struct, kw_only=True, tag="error", tag_field="type"):
    """A client message that was refused; ``field`` names what was wrong in it."""

    field: str
    detail: str


SubscribedJobs = Annotated[list[JobId], msgspec.Meta(max_length=MAX_SUBSCRIBED_JOBS)]


class Subscribe(msgspec.Struct, forbid_unknown_fields=True, tag="subscribe", tag_field="type"):
    """Receive these jobs (added to those already chosen) and, when given, runner and
    proxy updates; before its first ``subscribe`` a client receives everything."""

    jobs: SubscribedJobs = msgspec.field(default_factory=list)
    runners: bool | None = None
    proxies: bool | None = None


class Unsubscribe(msgspec.Struct, forbid_unknown_fields=True, tag="unsubscribe", tag_field="type"):
    jobs: SubscribedJobs = msgspec.field(default_factory=list)
    runners: bool | None = None  # true: stop runner updates
    proxies: bool | None = None


JobMessage = JobInfo | ProgressUpdate | FlowDoneUpdate | ClickDoneUpdate
ClientMessage = Subscribe | Unsubscribe
decode_client_message = msgspec.json.Decoder(ClientMessage).decode


def progress_update(job: JobView, seq: int, now: datetime) -> ProgressUpdate:
    return ProgressUpdate(
        job_id=job.job_id,
        status=job.status,
        total=job.flows_total,
        success=job.flows_done,
        fail=job.flows_failed,
        eta_seconds=eta_seconds(job, now),
        rate=rate_per_minute(job, now),
        targets=[_copy(TargetProgress, t) for t in job.targets],
        seq=seq,
    )


def job_info(job: JobView, seq: int) -> JobInfo:
    return _copy(JobInfo, job, seq=seq)


def flow_done_update(job_id: str, target: TargetView, seq: int) -> FlowDoneUpdate:
    return _copy(FlowDoneUpdate, target, job_id=job_id, seq=seq)


def click_done_update(job_id: str, target: TargetView, seq: int) -> ClickDoneUpdate:
    return _copy(ClickDoneUpdate, target, job_id=job_id, seq=seq)


def _copy(message: type[M], view: msgspec.Struct, **given: Any) -> M:
    """``message`` with each of its fields taken from the view's field of that name."""
    taken = {name: getattr(view, name) for name in message.__struct_fields__ if name not in given}
    return message(**taken, **given)


def _elapsed(job: JobView, now: datetime) -> float | None:
    if job.started_at is None:
        return None
    seconds = ((job.finished_at or now) - job.started_at).total_seconds()
    return seconds if seconds > 0 else None


def rate_per_minute(job: JobView, now: datetime) -> float | None:
    elapsed = _elapsed(job, now)
    if elapsed is None:
        return None
    return round((job.flows_done + job.flows_failed) * 60 / elapsed, 2)


def eta_seconds(job: JobView, now: datetime) -> float | None:
    finished = job.flows_done + job.flows_failed
    elapsed = _elapsed(job, now)
    if job.status != JobStatus.RUNNING or elapsed is None or finished == 0:
        return None
    return round((job.flows_total - finished) * elapsed / finished, 1)
