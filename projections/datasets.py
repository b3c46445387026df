"""Read model of datasets, their versions and who they are shared with (DESIGN §8), folded
from ``tb.dataset.<id>.*``: DatasetCreated, DatasetVersionUploaded, DatasetRenamed,
DatasetDeleted, DatasetShared, DatasetUnshared.

A version is immutable: its rows sit in the object store under ``object_name`` and are
checked against ``sha256``; a job names a dataset by id and version. Who may see a
dataset (its owner, those it is shared with, admins) is ``engine.datasets.access``; the
queries here take the caller's id and whether they are an admin.
"""

from __future__ import annotations

from datetime import datetime

import aiosqlite
import msgspec

from projections.db import iso
from schemas.events import (
    DatasetCreated,
    DatasetDeleted,
    DatasetEvent,
    DatasetRenamed,
    DatasetShared,
    DatasetUnshared,
    DatasetVersionUploaded,
    Envelope,
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS datasets (
        dataset_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        latest_version INTEGER NOT NULL DEFAULT 0,
        rows INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        deleted_at TEXT,
        last_seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS datasets_by_owner ON datasets (created_by, dataset_id)",
    """CREATE TABLE IF NOT EXISTS dataset_versions (
        dataset_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        format TEXT NOT NULL,
        object_name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        source_sha256 TEXT NOT NULL,
        source_size INTEGER NOT NULL,
        uploaded_by TEXT NOT NULL,
        uploaded_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (dataset_id, version)
    )""",
    """CREATE TABLE IF NOT EXISTS dataset_shares (
        dataset_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        PRIMARY KEY (dataset_id, user_id)
    )""",
    "CREATE INDEX IF NOT EXISTS dataset_shares_by_user ON dataset_shares (user_id, dataset_id)",
)


class DatasetView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /api/v1/datasets``: ``owner`` made it; ``shared_with`` may see and use it."""

    dataset_id: str
    name: str
    kind: str
    status: str  # "active" or "deleted"
    latest_version: int
    rows: int  # of the latest version
    owner: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None = None
    shared_with: list[str] = []


class VersionView(msgspec.Struct, kw_only=True):
    dataset_id: str
    version: int
    format: str
    sha256: str  # of the stored rows (JSON lines)
    size_bytes: int
    rows: int
    source_sha256: str  # of the file as uploaded
    source_size: int
    uploaded_by: str
    uploaded_at: datetime


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one dataset event; returns the datasets that changed."""
    event = env.event
    if not isinstance(event, DatasetEvent):
        return set()
    did, at = event.dataset_id, iso(event.at)
    match event:
        case DatasetCreated(name=name, kind=kind, owner=owner):
            await db.execute(
                "INSERT INTO datasets (dataset_id, name, kind, status, created_by, created_at,"
                " updated_at, last_seq) VALUES (?, ?, ?, 'active', ?, ?, ?, ?)"
                " ON CONFLICT (dataset_id) DO NOTHING",
                (did, name, kind, owner, at, at, env.seq),
            )
        case DatasetVersionUploaded():
            await db.execute(
                "INSERT INTO dataset_versions (dataset_id, version, format, object_name, sha256,"
                " size_bytes, rows, source_sha256, source_size, uploaded_by, uploaded_at,"
                " last_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (dataset_id, version) DO NOTHING",
                (did, event.version, event.format, event.object_name, event.sha256,
                 event.size_bytes, event.rows, event.source_sha256, event.source_size,
                 event.actor, at, env.seq),
            )  # fmt: skip
            await db.execute(
                "UPDATE datasets SET latest_version = ?, rows = ?, updated_at = ?, last_seq = ?"
                " WHERE dataset_id = ? AND latest_version < ?",
                (event.version, event.rows, at, env.seq, did, event.version),
            )
        case DatasetRenamed(name=name):
            await _update(db, env, "name = ?", (name,))
        case DatasetDeleted():
            await _update(db, env, "status = 'deleted', deleted_at = ?", (at,))
        case DatasetShared(user_id=user_id):
            await db.execute(
                "INSERT INTO dataset_shares (dataset_id, user_id) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                (did, user_id),
            )
        case DatasetUnshared(user_id=user_id):
            await db.execute(
                "DELETE FROM dataset_shares WHERE dataset_id = ? AND user_id = ?", (did, user_id)
            )
    return {did}


async def _update(
    db: aiosqlite.Connection, env: Envelope, sets: str, params: tuple[object, ...]
) -> None:
    event = env.event
    assert isinstance(event, DatasetEvent)
    await db.execute(
        f"UPDATE datasets SET {sets}, updated_at = ?, last_seq = ? WHERE dataset_id = ?",
        (*params, iso(event.at), env.seq, event.dataset_id),
    )


_COLUMNS = (
    "d.dataset_id, d.name, d.kind, d.status, d.latest_version, d.rows, d.created_by AS owner,"
    " d.created_at, d.updated_at, d.deleted_at"
)
_VISIBLE = (
    "(? OR d.created_by = ? OR EXISTS (SELECT 1 FROM dataset_shares s"
    " WHERE s.dataset_id = d.dataset_id AND s.user_id = ?))"
)


async def list_datasets(
    db: aiosqlite.Connection,
    user_id: str,
    *,
    admin: bool,
    kind: str | None = None,
    limit: int = -1,
    after: str | None = None,
) -> list[DatasetView]:
    """The datasets the caller may see (not deleted ones), oldest first; ``after`` the
    previous page's last dataset id."""
    where = f"d.status = 'active' AND {_VISIBLE}"
    params: tuple[object, ...] = (admin, user_id, user_id)
    if kind is not None:
        where += " AND d.kind = ?"
        params = (*params, kind)
    if after is not None:
        where += " AND d.rowid > (SELECT rowid FROM datasets WHERE dataset_id = ?)"
        params = (*params, after)
    sql = f"SELECT {_COLUMNS} FROM datasets d WHERE {where} ORDER BY d.rowid LIMIT ?"
    return await _views(db, sql, (*params, limit))


async def get_dataset(db: aiosqlite.Connection, dataset_id: str) -> DatasetView | None:
    """One dataset, deleted or not, whoever may see it (the caller checks)."""
    found = await _views(
        db, f"SELECT {_COLUMNS} FROM datasets d WHERE d.dataset_id = ?", (dataset_id,)
    )
    if not found:
        return None
    shares = await db.execute_fetchall(
        "SELECT user_id FROM dataset_shares WHERE dataset_id = ? ORDER BY user_id", (dataset_id,)
    )
    return msgspec.structs.replace(found[0], shared_with=[str(row[0]) for row in shares])


async def list_versions(db: aiosqlite.Connection, dataset_id: str) -> list[VersionView]:
    async with db.execute(
        "SELECT dataset_id, version, format, sha256, size_bytes, rows, source_sha256,"
        " source_size, uploaded_by, uploaded_at FROM dataset_versions WHERE dataset_id = ?"
        " ORDER BY version",
        (dataset_id,),
    ) as cur:
        names = [column[0] for column in cur.description]
        rows = await cur.fetchall()
    return [
        msgspec.convert(dict(zip(names, row, strict=True)), VersionView, strict=False)
        for row in rows
    ]


async def _views(
    db: aiosqlite.Connection, sql: str, params: tuple[object, ...]
) -> list[DatasetView]:
    async with db.execute(sql, params) as cur:
        names = [column[0] for column in cur.description]
        rows = await cur.fetchall()
    return [
        msgspec.convert(dict(zip(names, row, strict=True)), DatasetView, strict=False)
        for row in rows
    ]
