"""Reading the audit trail: filtered pages by stream sequence, and batches for export.

Every read is keyset-paged on ``seq`` (``seq > after ORDER BY seq LIMIT n``): a page
costs the same at the end of a long trail as at its start, and an export holds one
batch at a time however many events match.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
    rows = await _rows(db, where, after=after, upto=None, limit=limit + 1)
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
) -> AsyncIterator[list[AuditLine]]:
    """Every matching event the read model holds now, ``batch`` rows at a time (default
    ``EXPORT_BATCH``): events applied while the export runs are left to the next one,
    so it ends."""
    batch = batch or EXPORT_BATCH
    upto, after = await applied_seq(db), 0
    while True:
        rows = await _rows(db, where, after=after, upto=upto, limit=batch)
        if not rows:
            return
        yield [
            AuditLine(
                seq=seq, subject=subject, at=at, actor=actor, type=kind, job_id=job_id,
                event=msgspec.Raw(event.encode()),
            )
            for seq, subject, at, actor, kind, job_id, event in rows
        ]  # fmt: skip
        after = rows[-1][0]


async def _rows(
    db: aiosqlite.Connection, where: AuditFilter, *, after: int, upto: int | None, limit: int
) -> list[Row]:
    clauses, params = where.where()
    sql = f"SELECT {_COLUMNS} FROM audit WHERE seq > ?"
    if upto is not None:
        sql += " AND seq <= ?"
    if clauses:
        sql += f" AND {clauses}"
    sql += " ORDER BY seq LIMIT ?"
    bounds = [after] if upto is None else [after, upto]
    rows = await db.execute_fetchall(sql, [*bounds, *params, limit])
    return [tuple(row) for row in rows]
