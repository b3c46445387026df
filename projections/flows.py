"""Read model of every flow's status, and what its progress adds to its job and target.

What a flow's events mean is ``schemas.flow_lifecycle`` (the dispatcher applies the
same rule). A batch is folded in memory: the rows of the flows it names, with their
jobs' attempt limits and whether those are open, are read in one query (``FlowBatch.
load``), each event is a transition in Python, and ``flush`` writes each changed flow
once and each job's and target's counts as one sum. The result is the one the events
would give folded one by one: the caller flushes before anything else writes a job's
row (a job event), and reloads that job's limits after it (``reload_job``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

import aiosqlite
import msgspec

from projections.db import iso, select_in
from schemas.events import (
    Envelope,
    Event,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    FlowStarted,
)
from schemas.flow_lifecycle import FlowProgress, FlowState, FlowStatus, flow_transition
from schemas.values import TERMINAL_JOB_STATUSES, JobSettings

_PROGRESS: frozenset[type[Event]] = frozenset(
    {FlowDispatched, FlowStarted, FlowDone, FlowFailed, FlowStalled, FlowReleased}
)

SCHEMA = (
    # no foreign key: limits retention may have dropped a job's JobCreated while its
    # flow events remain, and the model must still fold what the log holds
    """CREATE TABLE IF NOT EXISTS flows (
        flow_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        target_idx INTEGER,
        status TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0,
        runner_id TEXT,
        reason TEXT,
        clicks_done INTEGER NOT NULL DEFAULT 0,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS flows_by_job ON flows (job_id, status)",
)

_DEFAULT_MAX_ATTEMPTS = JobSettings().max_attempts
_UPSERT = (
    "INSERT INTO flows (flow_id, job_id, target_idx, status, attempt, tries, runner_id,"
    " reason, clicks_done, duration_ms, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (flow_id) DO UPDATE SET target_idx = excluded.target_idx,"
    " status = excluded.status, attempt = excluded.attempt, tries = excluded.tries,"
    " runner_id = excluded.runner_id, reason = excluded.reason,"
    " clicks_done = excluded.clicks_done, duration_ms = excluded.duration_ms,"
    " updated_at = excluded.updated_at"
)


def is_progress(event: Event) -> TypeGuard[FlowProgress]:
    """An event that moves a flow on (event classes are final: the type is enough)."""
    return type(event) in _PROGRESS


class _FlowRow(msgspec.Struct, array_like=True):
    job_id: str
    target_idx: int | None = None
    status: FlowStatus = "queued"
    attempt: int = 0
    tries: int = 0
    runner_id: str | None = None
    reason: str | None = None
    clicks_done: int = 0
    duration_ms: int = 0


@dataclass(slots=True)
class _Flow:
    row: _FlowRow
    state: FlowState
    changed_at: datetime | None = None  # not written yet: the time of its last change


@dataclass(slots=True)
class _Counts:
    """What a batch's transitions add to a job (or, without the times, a target)."""

    done: int = 0
    failed: int = 0
    clicks: int = 0
    duration_ms: int = 0
    at: datetime | None = None  # of the job's latest transition, and its sequence
    seq: int = 0


class FlowBatch:
    """The flows one batch names, folded in memory until ``flush``."""

    def __init__(self, flows: dict[str, _Flow], limits: dict[str, tuple[int, bool]]) -> None:
        self._flows = flows
        self._limits = limits  # job id -> (attempt limit, still open)
        self._jobs: dict[str, _Counts] = {}
        self._targets: dict[tuple[str, int | None], _Counts] = {}

    @classmethod
    async def load(cls, db: aiosqlite.Connection, batch: Iterable[Envelope]) -> FlowBatch:
        events = [env.event for env in batch if is_progress(env.event)]
        flows: dict[str, _Flow] = {}
        if not events:
            return cls(flows, {})
        rows = await select_in(
            db,
            "SELECT flow_id, job_id, target_idx, status, attempt, tries, runner_id, reason,"
            " clicks_done, duration_ms FROM flows WHERE flow_id IN ({})",
            sorted({event.flow_id for event in events}),
        )
        for flow_id, *fields in rows:
            row = msgspec.convert(fields, _FlowRow)
            flows[flow_id] = _Flow(row, FlowState(row.status, row.attempt, row.tries))
        batch_of = cls(flows, {})
        await batch_of._load_limits(db, {event.job_id for event in events})
        return batch_of

    async def _load_limits(self, db: aiosqlite.Connection, job_ids: set[str]) -> None:
        """A job without a row counts as open, with the default attempt limit."""
        for job_id in job_ids:
            self._limits[job_id] = (_DEFAULT_MAX_ATTEMPTS, True)
        rows = await select_in(
            db, "SELECT job_id, max_attempts, status FROM jobs WHERE job_id IN ({})",
            sorted(job_ids),
        )  # fmt: skip
        for job_id, max_attempts, status in rows:
            self._limits[job_id] = (max_attempts, status not in TERMINAL_JOB_STATUSES)

    async def reload_job(self, db: aiosqlite.Connection, job_id: str) -> None:
        """After a job event: its limits as its row now says."""
        if job_id in self._limits:
            await self._load_limits(db, {job_id})

    def apply(self, env: Envelope, event: FlowProgress) -> str | None:
        """Fold one flow event; the id of the job whose counts or flows changed, if any."""
        flow = self._flows.get(event.flow_id)
        old = flow.state if flow is not None else None
        max_attempts, job_open = self._limits[event.job_id]
        step = flow_transition(old, event, max_attempts=max_attempts, job_open=job_open)
        if step.state is None or step.state == old:
            return None  # a duplicate, stale or late report: the flow's state stands
        row = _next_row(flow.row if flow else _FlowRow(job_id=event.job_id), event, step.state)
        self._flows[event.flow_id] = _Flow(row, step.state, event.at)
        job = self._jobs.get(row.job_id)
        if job is None:
            job = self._jobs[row.job_id] = _Counts()
        clicks = row.clicks_done if step.done else 0
        duration = row.duration_ms if step.done else 0
        job.done += step.done
        job.failed += step.failed
        job.clicks += clicks
        job.duration_ms += duration
        job.at, job.seq = event.at, env.seq
        if step.counted:
            key = (row.job_id, row.target_idx)
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = _Counts()
            target.done += step.done
            target.failed += step.failed
            target.clicks += clicks
        return row.job_id

    async def flush(self, db: aiosqlite.Connection) -> None:
        """Write what changed since the last flush."""
        changed = [
            (flow_id, *msgspec.structs.astuple(f.row), iso(f.changed_at))
            for flow_id, f in self._flows.items()
            if f.changed_at is not None
        ]
        if changed:
            await db.executemany(_UPSERT, changed)
            for f in self._flows.values():
                f.changed_at = None
        if self._jobs:
            await db.executemany(
                "UPDATE jobs SET flows_done = flows_done + ?, flows_failed = flows_failed + ?,"
                " clicks_done = clicks_done + ?, duration_ms_total = duration_ms_total + ?,"
                " updated_at = ?, last_seq = ? WHERE job_id = ?",
                [_job_params(job_id, c) for job_id, c in self._jobs.items()],
            )
            self._jobs.clear()
        if self._targets:
            await db.executemany(
                "UPDATE targets SET flow_done = flow_done + ?, flow_failed = flow_failed + ?,"
                " click_done = click_done + ? WHERE job_id = ? AND idx = ?",
                [(c.done, c.failed, c.clicks, *key) for key, c in self._targets.items()],
            )
            self._targets.clear()


def _job_params(job_id: str, c: _Counts) -> tuple[Any, ...]:
    assert c.at is not None  # set by every transition counted in
    return (c.done, c.failed, c.clicks, c.duration_ms, iso(c.at), c.seq, job_id)


def _next_row(row: _FlowRow, event: FlowProgress, state: FlowState) -> _FlowRow:
    runner_id, reason = row.runner_id, row.reason
    match event:
        case FlowDispatched():
            runner_id = None  # a new attempt waits for whichever runner pulls it
        case FlowStarted() | FlowDone() | FlowFailed() | FlowReleased():
            runner_id = event.runner_id or runner_id
    match event:
        case FlowFailed() | FlowReleased():
            reason = event.reason
        case FlowStalled():
            reason = f"no end reported after {event.waited_seconds:g}s"
        case FlowDone():
            reason = None
    new = msgspec.structs.replace(
        row,
        status=state.status,
        attempt=state.attempt,
        tries=state.tries,
        runner_id=runner_id,
        reason=reason,
        target_idx=row.target_idx if isinstance(event, FlowStarted) else event.target_index,
    )
    if isinstance(event, FlowDone):
        return msgspec.structs.replace(
            new, clicks_done=event.clicks_done, duration_ms=event.duration_ms
        )
    return new
