"""Read model of licences: the plan each user was last assigned (``LicenseAssigned``).

A user with no row runs on ``schemas.licences.DEFAULT_PLAN``.
"""

from __future__ import annotations

import aiosqlite

from projections.db import iso
from schemas.events import Envelope, LicenseAssigned

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS licences (
        user_id TEXT PRIMARY KEY,
        plan TEXT NOT NULL,
        assigned_by TEXT NOT NULL,
        assigned_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
)


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one ``LicenseAssigned``; returns the user ids whose plan row changed."""
    event = env.event
    if not isinstance(event, LicenseAssigned):
        return set()
    await db.execute(
        "INSERT INTO licences (user_id, plan, assigned_by, assigned_at, last_seq)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET plan = excluded.plan,"
        " assigned_by = excluded.assigned_by, assigned_at = excluded.assigned_at,"
        " last_seq = excluded.last_seq WHERE excluded.last_seq > licences.last_seq",
        (event.user_id, event.plan, event.actor, iso(event.at), env.seq),
    )
    return {event.user_id}
