"""SQLite plumbing shared by every read model: connections, transactions, checkpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import msgspec

IN_CHUNK = 500  # ids per ``IN (…)``
_encode = msgspec.json.Encoder().encode

CHECKPOINTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS checkpoints (name TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
)


async def connect(path: Path, *, readonly: bool = False) -> aiosqlite.Connection:
    """A connection in autocommit mode: writes go through ``transaction`` explicitly."""
    if readonly:
        db = await aiosqlite.connect(
            f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None
        )
    else:
        db = await aiosqlite.connect(path, isolation_level=None)
    try:
        if not readonly:
            await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 5000")
    except BaseException:
        # a file that is no database: its connection's thread must not outlive the
        # refusal (a live one keeps the process from exiting)
        await db.close()
        raise
    return db


@asynccontextmanager
async def transaction(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """BEGIN IMMEDIATE … COMMIT; ROLLBACK on any error, cancellation included."""
    try:
        await db.execute("BEGIN IMMEDIATE")
        yield
        await db.execute("COMMIT")
    except BaseException:
        await _rollback(db)
        raise


async def _rollback(db: aiosqlite.Connection) -> None:
    # the connection's thread runs every queued call, even one whose caller was
    # cancelled: after this round trip a cancelled BEGIN or COMMIT has run too
    await db.execute_fetchall("SELECT 1")
    if db.in_transaction:
        await db.execute("ROLLBACK")


async def create_schema(db: aiosqlite.Connection, statements: Iterable[str]) -> None:
    """Idempotent: every statement is ``CREATE … IF NOT EXISTS``."""
    async with transaction(db):
        for statement in (*CHECKPOINTS_SCHEMA, *statements):
            await db.execute(statement)


async def checkpoint(db: aiosqlite.Connection, name: str) -> int:
    """The last stream sequence applied to the read model ``name`` (0 = none)."""
    rows = list(await db.execute_fetchall("SELECT seq FROM checkpoints WHERE name = ?", (name,)))
    return int(rows[0][0]) if rows else 0


async def set_checkpoint(db: aiosqlite.Connection, name: str, seq: int) -> None:
    await db.execute(
        "INSERT INTO checkpoints (name, seq) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET seq = excluded.seq",
        (name, seq),
    )


async def select_in(db: aiosqlite.Connection, sql: str, ids: list[str]) -> list[tuple[Any, ...]]:
    """The rows of ``sql``, whose ``{}`` is an ``IN`` list, for every id (in chunks)."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        marks = ", ".join("?" for _ in chunk)
        rows.extend(tuple(row) for row in await db.execute_fetchall(sql.format(marks), chunk))
    return rows


def iso(at: datetime) -> str:
    """Event time as sortable UTC text (``datetime.isoformat`` of it in UTC); naive
    datetimes are taken as UTC.

    A time at the edge of the calendar (9999-12-31T23:00-05:00) has no UTC spelling:
    it is kept as the last (or first) representable instant instead of failing the batch.
    """
    if at.tzinfo is not UTC:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        try:
            at = at.astimezone(UTC)
        except OverflowError:
            at = (datetime.max if at.year > 1 else datetime.min).replace(tzinfo=UTC)
    # msgspec writes RFC 3339 as isoformat does, with Z for +00:00, several times faster:
    # this runs for every event folded (a property test holds the two equal)
    return _encode(at)[1:-2].decode() + "+00:00"
