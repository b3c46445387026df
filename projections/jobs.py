"""Read model of jobs, their targets' progress and every flow's status."""

from __future__ import annotations

from typing import Literal

import aiosqlite
import msgspec

from projections.db import iso
from projections.flow_status import FlowProgress, FlowState, FlowStatus, flow_transition
from schemas.events import (
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowStarted,
    JobApprovalRequested,
    JobApproved,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobPaused,
    JobRefused,
    JobRejected,
    JobResumed,
    JobStarted,
)
from schemas.values import JobSettings

JobStatus = Literal["created", "refused", "running", "paused", "completed", "failed", "cancelled"]

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
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC, job_id DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at DESC)",
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
    # no foreign key: limits retention may have dropped a job's JobCreated while its
    # flow events remain, and the model must still fold what the log holds
    """CREATE TABLE IF NOT EXISTS flows (
        flow_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        target_idx INTEGER,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        runner_id TEXT,
        reason TEXT,
        clicks_done INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS flows_by_job ON flows (job_id, status)",
)

_FINISHED: frozenset[JobStatus] = frozenset({"refused", "completed", "failed", "cancelled"})


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one job or flow event; returns the ids of the jobs whose rows changed."""
    event = env.event
    match event:
        case JobCreated():
            return await _created(db, env, event)
        case FlowDispatched() | FlowStarted() | FlowDone() | FlowFailed():
            return await _flow(db, env, event)
        case JobApprovalRequested() | JobApproved():
            approval = "requested" if isinstance(event, JobApprovalRequested) else "approved"
            return await _update(db, env, event.job_id, "approval = ?", approval)
        case JobStarted():
            return await _status(
                db, env, event.job_id, "running", None,
                "flows_total = ?, started_at = COALESCE(started_at, ?)",
                event.flows_total, iso(event.at),
            )  # fmt: skip
        case JobRefused(reason=reason, hosts=hosts):
            return await _status(db, env, event.job_id, "refused", refusal(reason, hosts))
        case JobRejected(reason=reason):
            rejected = f"approval rejected: {reason}" if reason else "approval rejected"
            return await _status(
                db, env, event.job_id, "refused", rejected, "approval = ?", "rejected"
            )
        case JobPaused() | JobResumed():
            status: JobStatus = "paused" if isinstance(event, JobPaused) else "running"
            return await _status(db, env, event.job_id, status, None)
        case JobCancelled(reason=reason) | JobFailed(reason=reason):
            status = "cancelled" if isinstance(event, JobCancelled) else "failed"
            return await _status(db, env, event.job_id, status, reason)
        case JobCompleted():
            return await _status(db, env, event.job_id, "completed", None)
    return set()


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
        " max_attempts, priority, flows_total, created_by, created_at, updated_at, last_seq)"
        " VALUES (?, ?, 'created', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (job_id) DO NOTHING",
        (
            event.job_id, event.name, event.platform.os, event.platform.browser,
            s.instance_count, s.max_attempts, s.priority, sum(t.flows for t in event.targets),
            event.actor, iso(event.at), iso(event.at), env.seq,
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


async def _update(
    db: aiosqlite.Connection, env: Envelope, job_id: str, assignments: str, *params: object
) -> set[str]:
    cur = await db.execute(
        f"UPDATE jobs SET {assignments}, updated_at = ?, last_seq = ? WHERE job_id = ?",
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
    finished = "finished_at = COALESCE(finished_at, ?)" if status in _FINISHED else ""
    assignments = ", ".join(a for a in ("status = ?, reason = ?", more, finished) if a)
    extra = (iso(env.event.at),) if finished else ()
    return await _update(db, env, job_id, assignments, status, reason or None, *params, *extra)


class _FlowRow(msgspec.Struct, array_like=True):
    job_id: str
    target_idx: int | None = None
    status: FlowStatus = "queued"
    attempt: int = 0
    runner_id: str | None = None
    reason: str | None = None
    clicks_done: int = 0
    duration_ms: int = 0


async def _flow(db: aiosqlite.Connection, env: Envelope, event: FlowProgress) -> set[str]:
    row, max_attempts = await _flow_row(db, event)
    old = FlowState(row.status, row.attempt) if row else None
    step = flow_transition(old, event, max_attempts)
    if row is not None and step.state == old:
        return set()  # a duplicate or stale report: the first one already counted
    new = _next_row(row or _FlowRow(job_id=event.job_id), event, step.state)
    await db.execute(
        "INSERT INTO flows (flow_id, job_id, target_idx, status, attempt, runner_id, reason,"
        " clicks_done, duration_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (flow_id) DO UPDATE SET target_idx = excluded.target_idx,"
        " status = excluded.status, attempt = excluded.attempt, runner_id = excluded.runner_id,"
        " reason = excluded.reason, clicks_done = excluded.clicks_done,"
        " duration_ms = excluded.duration_ms, updated_at = excluded.updated_at",
        (event.flow_id, *msgspec.structs.astuple(new), iso(event.at)),
    )
    clicks = new.clicks_done if step.done else 0
    duration = new.duration_ms if step.done else 0
    await db.execute(
        "UPDATE jobs SET flows_done = flows_done + ?, flows_failed = flows_failed + ?,"
        " clicks_done = clicks_done + ?, duration_ms_total = duration_ms_total + ?,"
        " updated_at = ?, last_seq = ? WHERE job_id = ?",
        (step.done, step.failed, clicks, duration, iso(event.at), env.seq, new.job_id),
    )
    if step.counted:
        await db.execute(
            "UPDATE targets SET flow_done = flow_done + ?, flow_failed = flow_failed + ?,"
            " click_done = click_done + ? WHERE job_id = ? AND idx = ?",
            (step.done, step.failed, clicks, new.job_id, new.target_idx),
        )
    return {new.job_id}


def _next_row(row: _FlowRow, event: FlowProgress, state: FlowState) -> _FlowRow:
    runner_id = row.runner_id
    if isinstance(event, FlowDispatched):
        runner_id = None  # a new attempt waits for whichever runner pulls it
    elif event.runner_id:
        runner_id = event.runner_id
    new = msgspec.structs.replace(
        row,
        status=state.status,
        attempt=state.attempt,
        runner_id=runner_id,
        target_idx=row.target_idx if isinstance(event, FlowStarted) else event.target_index,
    )
    if isinstance(event, FlowFailed):
        return msgspec.structs.replace(new, reason=event.reason)
    if isinstance(event, FlowDone):
        return msgspec.structs.replace(
            new, reason=None, clicks_done=event.clicks_done, duration_ms=event.duration_ms
        )
    return new


async def _flow_row(db: aiosqlite.Connection, event: FlowProgress) -> tuple[_FlowRow | None, int]:
    """The flow's row, if any, and its job's attempt limit, in one round trip."""
    rows = await db.execute_fetchall(
        "SELECT f.job_id, f.target_idx, f.status, f.attempt, f.runner_id, f.reason,"
        " f.clicks_done, f.duration_ms, j.max_attempts"
        " FROM (SELECT ? AS flow_id, ? AS job_id) AS k"
        " LEFT JOIN flows AS f ON f.flow_id = k.flow_id"
        " LEFT JOIN jobs AS j ON j.job_id = k.job_id",
        (event.flow_id, event.job_id),
    )
    [(*flow, max_attempts)] = rows
    row = msgspec.convert(flow, _FlowRow) if flow[0] is not None else None
    return row, max_attempts or JobSettings().max_attempts
