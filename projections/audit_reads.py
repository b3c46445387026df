"""Reading the audit trail: filtered pages by stream sequence, and batches for export.

Every read is keyset-paged on ``seq`` (``seq > after ORDER BY seq LIMIT n``): a page
costs the same at the end of a long trail as at its start, and an export holds one
batch at a time however many events match.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import get_args

import aiosqlite
import msgspec

from projections.db import iso
from projections.read_model import applied_seq
from schemas.events import TbEvent

EVENT_TYPES = frozenset(cls.__name__ for cls in get_args(TbEvent))
EXPORT_BATCH = 1000

_COLUMNS = "seq, subject, at, actor, type, job_id, event"


@dataclass(frozen=True)
class AuditFilter:
    """Each set field narrows the trail; ``since`` is inclusive, ``until`` exclusive."""

    job_id: str | None = None
    actor: str | None = None
    type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        for clause, value in (
            ("job_id = ?", self.job_id),
            ("actor = ?", self.actor),
            ("type = ?", self.type),
            ("at >= ?", iso(self.since) if self.since else None),
            ("at < ?", iso(self.until) if self.until else None),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params


class AuditEntry(msgspec.Struct, kw_only=True):
    """One event of the log: where it is stored (``subject``, ``seq``), when and by whom,
    its type, its job when it belongs to one, and the event itself."""

    seq: int
    subject: str
    at: datetime
    actor: str
    type: str
    job_id: str | None
    event: dict[str, object]


class AuditLine(msgspec.Struct, kw_only=True):
    """An ``AuditEntry`` as exported: the event's stored JSON passed through undecoded."""

    seq: int
    subject: str
    at: str
    actor: str
    type: str
    job_id: str | None
    event: msgspec.Raw


Row = tuple[int, str, str, str, str, str | None, str]


async def page(
    db: aiosqlite.Connection, where: AuditFilter, *, after: int, limit: int
) -> tuple[list[AuditEntry], bool]:
    """Up to ``limit`` events after sequence ``after``, oldest first, and whether more
    matched when they were read."""
    rows = await _rows(db, where, after=after, limit=limit + 1)
    entries = [
        AuditEntry(
            seq=seq, subject=subject, at=datetime.fromisoformat(at), actor=actor, type=kind,
            job_id=job_id, event=msgspec.json.decode(event),
        )
        for seq, subject, at, actor, kind, job_id, event in rows[:limit]
    ]  # fmt: skip
    return entries, len(rows) > limit


async def batches(
    db: aiosqlite.Connection, where: AuditFilter, *, batch: int | None = None
) -> AsyncGenerator[list[AuditLine], None]:
    """Every matching event, ``batch`` rows at a time (default ``EXPORT_BATCH``), as of
    one snapshot of the read model: events applied meanwhile are left to the next export,
    so it ends. One query read in steps, so a time range is sorted once, not per batch.
    Give it a connection of its own: the snapshot is its read transaction, held until
    the last batch."""
    await db.execute("BEGIN")
    try:
        sql, params = _select(where, after=0, upto=await applied_seq(db))
        async with db.execute(sql, params) as cursor:
            while rows := list(await cursor.fetchmany(batch or EXPORT_BATCH)):
                yield [
                    AuditLine(
                        seq=seq, subject=subject, at=at, actor=actor, type=kind,
                        job_id=job_id, event=msgspec.Raw(event.encode()),
                    )
                    for seq, subject, at, actor, kind, job_id, event in rows
                ]  # fmt: skip
    finally:
        await db.execute("COMMIT")


async def _rows(
    db: aiosqlite.Connection, where: AuditFilter, *, after: int, limit: int
) -> list[Row]:
    sql, params = _select(where, after=after, upto=None)
    rows = await db.execute_fetchall(f"{sql} LIMIT ?", [*params, limit])
    return [tuple(row) for row in rows]


def _select(where: AuditFilter, *, after: int, upto: int | None) -> tuple[str, list[object]]:
    clauses, params = where.where()
    sql = f"SELECT {_COLUMNS} FROM audit WHERE seq > ?"
    bounds: list[object] = [after]
    if upto is not None:
        sql += " AND seq <= ?"
        bounds.append(upto)
    if clauses:
        sql += f" AND {clauses}"
    return f"{sql} ORDER BY seq", [*bounds, *params]
