"""Read model of the audit trail: every event of the log, one row each, by stream sequence.

A row keeps what an auditor filters on (subject, time, actor, type, the job it belongs
to) and the event itself as JSON. Duplicates stored after the dedupe window are separate
stored messages, so each keeps its own row; quarantined messages are no events and have
none (``GET /api/v1/quarantine`` lists them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard, get_args

import aiosqlite

from projections.db import iso
from schemas.events import Envelope, Event, FlowEvent, JobEvent, TbEvent, encode_event

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        subject TEXT NOT NULL,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        type TEXT NOT NULL,
        job_id TEXT,
        event TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_by_job ON audit (job_id, seq) WHERE job_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS audit_by_actor ON audit (actor, seq)",
    "CREATE INDEX IF NOT EXISTS audit_by_type ON audit (type, seq)",
    "CREATE INDEX IF NOT EXISTS audit_by_at ON audit (at)",
)


# job and flow events, by their exact types (event classes are final): cheaper to ask
# than isinstance, for every event of the log
_OF_A_JOB: frozenset[type[Event]] = frozenset(
    kind for kind in get_args(TbEvent) if issubclass(kind, JobEvent | FlowEvent)
)


def _of_a_job(event: Event) -> TypeGuard[JobEvent | FlowEvent]:
    return type(event) in _OF_A_JOB


def row(env: Envelope) -> tuple[int, str, str, str, str, str | None, str]:
    event = env.event
    job_id = event.job_id if _of_a_job(event) else None
    return (
        env.seq,
        env.subject,
        iso(event.at),
        event.actor,
        type(event).__name__,
        job_id,
        encode_event(event).decode(),
    )


async def apply(db: aiosqlite.Connection, batch: Sequence[Envelope]) -> None:
    """Record a batch of fresh events (the caller skips those already applied)."""
    if batch:
        await db.executemany(
            "INSERT INTO audit (seq, subject, at, actor, type, job_id, event)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [row(env) for env in batch],
        )
