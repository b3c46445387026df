"""Read model of users: name, role, whether disabled, when created and last logged in."""

from __future__ import annotations

import aiosqlite
import msgspec

from projections.db import iso
from schemas.events import (
    Envelope,
    RoleChanged,
    UserCreated,
    UserDisabled,
    UserEnabled,
    UserLoggedIn,
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS users (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        role TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        last_login_at TEXT,
        last_seq INTEGER NOT NULL
    )""",
)


class UserRow(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    username: str
    role: str
    disabled: bool
    created_at: str
    last_login_at: str | None


async def apply(db: aiosqlite.Connection, env: Envelope) -> None:
    event = env.event
    match event:
        case UserCreated(user_id=user_id, username=username, role=role):
            await db.execute(
                "INSERT OR REPLACE INTO users (user_id, username, role, created_at, last_seq)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, username, role, iso(event.at), env.seq),
            )
        case RoleChanged(user_id=user_id, role=role):
            await db.execute(
                "UPDATE users SET role = ?, last_seq = ? WHERE user_id = ?",
                (role, env.seq, user_id),
            )
        case UserDisabled(user_id=user_id) | UserEnabled(user_id=user_id):
            await db.execute(
                "UPDATE users SET disabled = ?, last_seq = ? WHERE user_id = ?",
                (int(isinstance(event, UserDisabled)), env.seq, user_id),
            )
        case UserLoggedIn(user_id=user_id):
            await db.execute(
                "UPDATE users SET last_login_at = ?, last_seq = ? WHERE user_id = ?",
                (iso(event.at), env.seq, user_id),
            )


_COLUMNS = "user_id, username, role, disabled, created_at, last_login_at"


def _row(r: tuple[object, ...]) -> UserRow:
    return UserRow(
        user_id=str(r[0]),
        username=str(r[1]),
        role=str(r[2]),
        disabled=bool(r[3]),
        created_at=str(r[4]),
        last_login_at=None if r[5] is None else str(r[5]),
    )


async def user(db: aiosqlite.Connection, user_id: str) -> UserRow | None:
    rows = list(
        await db.execute_fetchall(f"SELECT {_COLUMNS} FROM users WHERE user_id = ?", (user_id,))
    )
    return _row(tuple(rows[0])) if rows else None


async def users(db: aiosqlite.Connection) -> list[UserRow]:
    rows = await db.execute_fetchall(f"SELECT {_COLUMNS} FROM users ORDER BY username")
    return [_row(tuple(r)) for r in rows]
