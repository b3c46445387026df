"""Read model of runner agents: who is registered, on which platform, with how many slots."""

from __future__ import annotations

from typing import Literal

import aiosqlite

from projections.db import iso
from schemas.events import Envelope, RunnerDeregistered, RunnerDraining, RunnerRegistered

RunnerStatus = Literal["registered", "draining", "deregistered"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runners (
        runner_id TEXT PRIMARY KEY,
        os TEXT NOT NULL,
        browser TEXT NOT NULL,
        slots INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        version TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        registered_at TEXT NOT NULL,
        last_event_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
)


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one runner event; returns the ids of the runners whose rows changed."""
    event = env.event
    match event:
        case RunnerRegistered():
            # a runner that comes back registers again under its id: start a fresh record
            await db.execute(
                "INSERT INTO runners (runner_id, os, browser, slots, hostname, version, status,"
                " registered_at, last_event_at, last_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, 'registered', ?, ?, ?)"
                " ON CONFLICT (runner_id) DO UPDATE SET os = excluded.os,"
                " browser = excluded.browser, slots = excluded.slots,"
                " hostname = excluded.hostname, version = excluded.version,"
                " status = excluded.status, reason = NULL,"
                " registered_at = excluded.registered_at,"
                " last_event_at = excluded.last_event_at, last_seq = excluded.last_seq",
                (
                    event.runner_id, event.platform.os, event.platform.browser, event.slots,
                    event.hostname, event.version, iso(event.at), iso(event.at), env.seq,
                ),
            )  # fmt: skip
            return {event.runner_id}
        case RunnerDraining() | RunnerDeregistered():
            status: RunnerStatus = (
                "draining" if isinstance(event, RunnerDraining) else "deregistered"
            )
            reason = event.reason or None if isinstance(event, RunnerDeregistered) else None
            cur = await db.execute(
                "UPDATE runners SET status = ?, reason = ?, last_event_at = ?, last_seq = ?"
                " WHERE runner_id = ?",
                (status, reason, iso(event.at), env.seq, event.runner_id),
            )
            return {event.runner_id} if cur.rowcount else set()
    return set()
