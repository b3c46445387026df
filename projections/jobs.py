"""Read model of jobs and their targets' progress.

A job that is closed (refused, completed, failed or cancelled) keeps its status, and
counts whatever arrives after; what its flows add to the counts is ``projections.flows``.
"""

from __future__ import annotations

import aiosqlite
import msgspec

from projections.db import iso
from schemas.events import (
    EgressRefused,
    Envelope,
    JobApprovalRequested,
    JobApproved,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobPaused,
    JobProgressed,
    JobRefused,
    JobRejected,
    JobResumed,
    JobStarted,
)
from schemas.values import TERMINAL_JOB_STATUSES, JobSettings, JobStatus, Platform

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        approval TEXT,
        platform_os TEXT NOT NULL,
        platform_browser TEXT NOT NULL,
        instance_count INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        flows_total INTEGER NOT NULL,
        flows_done INTEGER NOT NULL DEFAULT 0,
        flows_failed INTEGER NOT NULL DEFAULT 0,
        clicks_done INTEGER NOT NULL DEFAULT 0,
        duration_ms_total INTEGER NOT NULL DEFAULT 0,
        egress_refused INTEGER NOT NULL DEFAULT 0,
        kind TEXT NOT NULL DEFAULT 'flows',
        progress INTEGER,
        progress_message TEXT,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        datasets TEXT,
        device_catalogue INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC, job_id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_creator ON jobs (created_by, status)",
    """CREATE TABLE IF NOT EXISTS targets (
        job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        url TEXT NOT NULL,
        label TEXT,
        referrer TEXT,
        flow_target INTEGER NOT NULL,
        flow_done INTEGER NOT NULL DEFAULT 0,
        flow_failed INTEGER NOT NULL DEFAULT 0,
        click_target INTEGER NOT NULL,
        click_done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    )""",
    # one row per refusal a flow attempt reported: a refusal stored again after the
    # dedupe window (a redelivered work item reports under the same n) counts once
    """CREATE TABLE IF NOT EXISTS egress_refusals (
        flow_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (flow_id, attempt, n)
    )""",
)

_CLOSED = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL_JOB_STATUSES))


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one job event or egress refusal (flow progress is ``projections.flows``);
    returns the ids of the jobs whose rows changed."""
    event = env.event
    match event:
        case JobCreated():
            return await _created(db, env, event)
        case JobApprovalRequested() | JobApproved():
            approval = "requested" if isinstance(event, JobApprovalRequested) else "approved"
            return await _update(db, env, event.job_id, "approval = ?", approval)
        case JobStarted():
            return await _status(
                db, env, event.job_id, JobStatus.RUNNING, None,
                "flows_total = ?, started_at = COALESCE(started_at, ?)",
                event.flows_total, iso(event.at),
            )  # fmt: skip
        case JobRefused(reason=reason, hosts=hosts):
            await _placeholder(db, env, event)
            return await _status(db, env, event.job_id, JobStatus.REFUSED, refusal(reason, hosts))
        case JobRejected(reason=reason):
            rejected = f"approval rejected: {reason}" if reason else "approval rejected"
            return await _status(
                db, env, event.job_id, JobStatus.REFUSED, rejected, "approval = ?", "rejected"
            )
        case JobPaused(reason=reason):
            return await _status(db, env, event.job_id, JobStatus.PAUSED, reason)
        case JobResumed():
            return await _status(db, env, event.job_id, JobStatus.RUNNING, None)
        case JobProgressed(percent=percent, message=message):
            return await _update(
                db, env, event.job_id, "progress = ?, progress_message = ?", percent, message
            )
        case JobCancelled(reason=reason):
            return await _status(db, env, event.job_id, JobStatus.CANCELLED, reason)
        case JobFailed(reason=reason):
            return await _status(db, env, event.job_id, JobStatus.FAILED, reason)
        case JobCompleted():
            return await _status(db, env, event.job_id, JobStatus.COMPLETED, None)
        case EgressRefused():
            return await _egress_refused(db, event)
    return set()


async def _egress_refused(db: aiosqlite.Connection, event: EgressRefused) -> set[str]:
    """Counted whatever the job's status: a refusal is a fact about the flow's browser."""
    cur = await db.execute(
        "INSERT INTO egress_refusals (flow_id, attempt, n) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (event.flow_id, event.attempt, event.n),
    )
    if not cur.rowcount:
        return set()
    cur = await db.execute(
        "UPDATE jobs SET egress_refused = egress_refused + 1 WHERE job_id = ?", (event.job_id,)
    )
    return {event.job_id} if cur.rowcount else set()


def refusal(reason: str, hosts: list[str]) -> str:
    """The refusal as shown to users: it always names the hosts that were refused."""
    missing = [host for host in hosts if host not in reason]
    if not missing:
        return reason
    return f"{reason}: {', '.join(missing)}" if reason else ", ".join(missing)


async def _created(db: aiosqlite.Connection, env: Envelope, event: JobCreated) -> set[str]:
    s = event.settings
    cur = await db.execute(
        "INSERT INTO jobs (job_id, name, status, platform_os, platform_browser, instance_count,"
        " max_attempts, priority, flows_total, kind, created_by, created_at, updated_at, last_seq,"
        " datasets, device_catalogue)"
        " VALUES (?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id) DO NOTHING",
        (
            event.job_id, event.name, event.platform.os, event.platform.browser,
            s.instance_count, s.max_attempts, s.priority, sum(t.flows for t in event.targets),
            event.kind, event.actor, iso(event.at), iso(event.at), env.seq,
            msgspec.json.encode(event.datasets).decode() if event.datasets else None,
            event.device_catalogue.version if event.device_catalogue else None,
        ),
    )  # fmt: skip
    if not cur.rowcount:
        return set()  # stored again after the dedupe window: the job exists
    await db.executemany(
        "INSERT INTO targets (job_id, idx, url, label, referrer, flow_target, click_target)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (event.job_id, idx, t.url, t.label, t.referrer, t.flows, t.flows * t.clicks)
            for idx, t in enumerate(event.targets)
        ],
    )
    return {event.job_id}


async def _placeholder(db: aiosqlite.Connection, env: Envelope, event: JobRefused) -> None:
    """A row for a job the log holds no valid creation of (its JobCreated was
    quarantined): a refusal must still show on ``GET /api/v1/jobs/{job_id}``."""
    settings, platform = JobSettings(), Platform()
    await db.execute(
        "INSERT INTO jobs (job_id, name, status, platform_os, platform_browser, instance_count,"
        " max_attempts, priority, flows_total, created_by, created_at, updated_at, last_seq)"
        " VALUES (?, '', ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?) ON CONFLICT (job_id) DO NOTHING",
        (
            event.job_id, JobStatus.CREATED.value, platform.os, platform.browser,
            settings.instance_count, settings.max_attempts, settings.priority,
            event.actor, iso(event.at), iso(event.at), env.seq,
        ),
    )  # fmt: skip


async def _update(
    db: aiosqlite.Connection, env: Envelope, job_id: str, assignments: str, *params: object
) -> set[str]:
    """Change an open job's row; a closed job's row stays as it closed."""
    cur = await db.execute(
        f"UPDATE jobs SET {assignments}, updated_at = ?, last_seq = ?"
        f" WHERE job_id = ? AND status NOT IN ({_CLOSED})",
        (*params, iso(env.event.at), env.seq, job_id),
    )
    return {job_id} if cur.rowcount else set()


async def _status(
    db: aiosqlite.Connection,
    env: Envelope,
    job_id: str,
    status: JobStatus,
    reason: str | None,
    more: str = "",
    *params: object,
) -> set[str]:
    finished = "finished_at = COALESCE(finished_at, ?)" if status in TERMINAL_JOB_STATUSES else ""
    assignments = ", ".join(a for a in ("status = ?, reason = ?", more, finished) if a)
    extra = (iso(env.event.at),) if finished else ()
    return await _update(
        db, env, job_id, assignments, status.value, reason or None, *params, *extra
    )
