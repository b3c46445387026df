"""Reads for the API: each returns DTOs defined here, ready to encode."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import aiosqlite
import msgspec

from projections.consents import domain_key
from projections.metrics_views import RunMetrics
from projections.runners import RunnerStatus
from schemas.consent_state import ConsentStatus, status_at
from schemas.flow_lifecycle import FlowStatus
from schemas.licences import DEFAULT_PLAN
from schemas.values import JobKind, JobStatus, UsedVersion

S = TypeVar("S", bound=msgspec.Struct)


class TargetView(msgspec.Struct, kw_only=True, omit_defaults=True):
    idx: int
    url: str
    label: str | None = None
    referrer: str | None = None
    flow_target: int
    flow_done: int
    flow_failed: int
    click_target: int
    click_done: int


class JobView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /api/v1/jobs/{job_id}``; ``reason`` is present only for refused, failed or
    cancelled jobs that gave one; ``detail`` says what a running job waits for (the API
    fills it in from what is true now, e.g. no runner online for its platform)."""

    job_id: str
    name: str
    status: JobStatus
    reason: str | None = None
    detail: str | None = None
    approval: str | None = None
    platform_os: str
    platform_browser: str
    instance_count: int
    max_attempts: int
    priority: int
    flows_total: int
    flows_done: int
    flows_failed: int
    clicks_done: int
    duration_ms_total: int
    egress_refused: int  # connections the runners' egress proxy refused to its flows
    kind: JobKind = "flows"
    progress: int | None = None  # percent an external job's worker reported
    progress_message: str | None = None  # the line that reported it
    targets: list[TargetView]
    created_by: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    last_seq: int
    metrics: RunMetrics | None = None  # one job's read only: rate, ETA, durations, web vitals
    # the dataset versions the job was made from, by kind
    datasets: dict[str, UsedVersion] | None = None
    # the device catalogue version its devices resolve against (None: from before versions)
    device_catalogue: int | None = None


class FlowView(msgspec.Struct, kw_only=True, omit_defaults=True):
    flow_id: str
    job_id: str
    target_idx: int | None = None
    status: FlowStatus
    attempt: int
    runner_id: str | None = None
    reason: str | None = None
    clicks_done: int
    duration_ms: int
    updated_at: datetime


class RunnerView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A runner as its events tell it; ``flows_completed`` and ``flows_failed`` count the
    flow runs it reported since it last registered."""

    runner_id: str
    os: str
    browser: str
    browser_version: str = ""
    slots: int
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    hostname: str
    version: str
    status: RunnerStatus
    reason: str | None = None
    flows_completed: int = 0
    flows_failed: int = 0
    registered_at: datetime
    last_event_at: datetime


class PlatformView(msgspec.Struct, kw_only=True):
    """A platform some non-deregistered runner serves, with the fleet's slots on it."""

    os: str
    browser: str
    runners: int
    slots: int


class ConsentView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``token`` is public: the domain owner publishes it to prove control. ``status`` is
    the log's until ``at`` gives it as of a time (``expired`` past ``expires_at``)."""

    domain: str
    status: ConsentStatus
    token: str | None = None
    method: str | None = None
    evidence: str | None = None
    verified_at: datetime | None = None
    expires_at: datetime | None = None  # a verified consent authorises nothing after it
    max_concurrent: int | None = None
    max_flows_per_minute: int | None = None
    include_subdomains: bool = False  # asked for by the claim; granted by a DNS verification
    reason: str | None = None
    updated_at: datetime

    def at(self, now: datetime) -> ConsentView:
        """The consent as it stands at ``now``."""
        return msgspec.structs.replace(self, status=status_at(self.status, self.expires_at, now))


_JOB_COLUMNS = (
    "job_id, name, status, reason, approval, platform_os, platform_browser, instance_count,"
    " max_attempts, priority, flows_total, flows_done, flows_failed, clicks_done,"
    " duration_ms_total, egress_refused, kind, progress, progress_message, created_by,"
    " created_at, started_at, finished_at,"
    " updated_at, last_seq, datasets, device_catalogue"
)
_FLOW_COLUMNS = (
    "flow_id, job_id, target_idx, status, attempt, runner_id, reason, clicks_done,"
    " duration_ms, updated_at"
)
_TARGET_COLUMNS = (
    "job_id, idx, url, label, referrer, flow_target, flow_done, flow_failed, click_target,"
    " click_done"
)


async def get_job(db: aiosqlite.Connection, job_id: str) -> JobView | None:
    jobs = await _jobs(db, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
    return jobs[0] if jobs else None


async def get_jobs(db: aiosqlite.Connection, job_ids: Collection[str]) -> list[JobView]:
    """The jobs of ``job_ids`` that exist, in no set order (keep the ids to a few hundred)."""
    if not job_ids:
        return []
    marks = ", ".join("?" for _ in job_ids)
    return await _jobs(
        db, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id IN ({marks})", list(job_ids)
    )


async def list_jobs(
    db: aiosqlite.Connection,
    limit: int = 50,
    offset: int = 0,
    status: JobStatus | None = None,
    after: tuple[str, str] | None = None,
) -> list[JobView]:
    """Newest first; ``after``: the (created_at, job_id) of the previous page's last job."""
    conditions: list[str] = []
    params: list[object] = []
    if status:
        conditions.append("status = ?")
        params.append(status)
    if after:
        conditions.append("(created_at, job_id) < (?, ?)")
        params.extend(after)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return await _jobs(
        db,
        f"SELECT {_JOB_COLUMNS} FROM jobs {where}"
        " ORDER BY created_at DESC, job_id DESC LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )


async def list_flows(
    db: aiosqlite.Connection,
    job_id: str,
    *,
    status: FlowStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[FlowView]:
    where, params = (" AND status = ?", (status,)) if status else ("", ())
    return await _fetch(
        db,
        FlowView,
        f"SELECT {_FLOW_COLUMNS} FROM flows WHERE job_id = ?{where}"
        " ORDER BY updated_at DESC, flow_id LIMIT ? OFFSET ?",
        (job_id, *params, limit, offset),
    )


async def page_of_flows(
    db: aiosqlite.Connection,
    job_id: str,
    *,
    limit: int,
    status: FlowStatus | None = None,
    after: str | None = None,
) -> list[FlowView]:
    """A job's flows by id (a stable order while they change), from after ``after``."""
    params: list[object] = [status] if status else []
    where = " AND status = ?" if status else ""
    if after is not None:
        where += " AND flow_id > ?"
        params.append(after)
    return await _fetch(
        db,
        FlowView,
        f"SELECT {_FLOW_COLUMNS} FROM flows WHERE job_id = ?{where} ORDER BY flow_id LIMIT ?",
        (job_id, *params, limit),
    )


async def get_flow(db: aiosqlite.Connection, flow_id: str) -> FlowView | None:
    flows = await _fetch(
        db,
        FlowView,
        f"SELECT {_FLOW_COLUMNS} FROM flows WHERE flow_id = ?",
        (flow_id,),
    )
    return flows[0] if flows else None


async def list_runners(
    db: aiosqlite.Connection, runner_ids: Collection[str] | None = None
) -> list[RunnerView]:
    """Every runner that registered, or only those of ``runner_ids``."""
    where = ""
    if runner_ids is not None:
        if not runner_ids:
            return []
        where = f" WHERE runner_id IN ({', '.join('?' for _ in runner_ids)})"
    rows = await _rows(
        db,
        "SELECT runner_id, os, browser, browser_version, slots, labels, hostname, version,"
        " status, reason, flows_completed, flows_failed, registered_at, last_event_at"
        f" FROM runners{where} ORDER BY runner_id",
        list(runner_ids or ()),
    )
    return [
        msgspec.convert({**row, "labels": msgspec.json.decode(row["labels"])}, RunnerView)
        for row in rows
    ]


async def list_platforms(db: aiosqlite.Connection) -> list[PlatformView]:
    return await _fetch(
        db,
        PlatformView,
        "SELECT os, browser, COUNT(*) AS runners, SUM(slots) AS slots FROM runners"
        " WHERE status != 'deregistered' GROUP BY os, browser ORDER BY os, browser",
    )


_CONSENT_QUERY = (
    "SELECT domain, status, token, method, evidence, verified_at, expires_at, max_concurrent,"
    " max_flows_per_minute, include_subdomains, reason, updated_at FROM consents"
)


async def list_consents(
    db: aiosqlite.Connection, limit: int = -1, after: str | None = None
) -> list[ConsentView]:
    """By domain; ``after``: the previous page's last domain; ``limit`` -1: every one."""
    where, params = (" WHERE domain > ?", (after,)) if after is not None else ("", ())
    sql = f"{_CONSENT_QUERY}{where} ORDER BY domain LIMIT ?"
    return await _fetch(db, ConsentView, sql, (*params, limit), strict=False)


async def get_consent(db: aiosqlite.Connection, domain: str) -> ConsentView | None:
    found = await _fetch(
        db, ConsentView, f"{_CONSENT_QUERY} WHERE domain = ?", (domain_key(domain),), strict=False
    )
    return found[0] if found else None


async def plan_of(db: aiosqlite.Connection, user_id: str) -> str:
    """The name of the plan last assigned to the user, ``DEFAULT_PLAN`` when none was."""
    rows = list(
        await db.execute_fetchall("SELECT plan FROM licences WHERE user_id = ?", (user_id,))
    )
    return str(rows[0][0]) if rows else DEFAULT_PLAN


_STARTED = ", ".join(f"'{status.value}'" for status in (JobStatus.RUNNING, JobStatus.PAUSED))


async def running_jobs(db: aiosqlite.Connection, user_id: str) -> int:
    """The user's jobs that have started and not ended (what ``concurrent_jobs`` limits)."""
    rows = list(
        await db.execute_fetchall(
            f"SELECT COUNT(*) FROM jobs WHERE created_by = ? AND status IN ({_STARTED})",
            (user_id,),
        )
    )
    return int(rows[0][0])


async def _jobs(db: aiosqlite.Connection, sql: str, params: Sequence[object]) -> list[JobView]:
    rows = await _rows(db, sql, params)
    if not rows:
        return []
    ids = [row["job_id"] for row in rows]
    targets: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in ids}
    marks = ", ".join("?" for _ in ids)
    for target in await _rows(
        db,
        f"SELECT {_TARGET_COLUMNS} FROM targets WHERE job_id IN ({marks}) ORDER BY job_id, idx",
        ids,
    ):
        targets[target.pop("job_id")].append(target)
    return [
        msgspec.convert(
            {
                **row,
                "targets": targets[row["job_id"]],
                "datasets": msgspec.json.decode(row["datasets"]) if row["datasets"] else None,
            },
            JobView,
        )
        for row in rows
    ]


async def _fetch(
    db: aiosqlite.Connection,
    view: type[S],
    sql: str,
    params: Sequence[object] = (),
    *,
    strict: bool = True,  # False: SQLite's 0/1 read as a bool
) -> list[S]:
    return [msgspec.convert(row, view, strict=strict) for row in await _rows(db, sql, params)]


async def _rows(
    db: aiosqlite.Connection, sql: str, params: Iterable[object]
) -> list[dict[str, Any]]:
    """Rows as column-name mappings, only as input to ``msgspec.convert``."""
    async with db.execute(sql, tuple(params)) as cur:
        names = [column[0] for column in cur.description]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]
