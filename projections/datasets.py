"""Read model of datasets and their versions (DESIGN §8): the tables, ready for the
dataset events (``tb.dataset.<id>.*``: DatasetCreated, DatasetVersionUploaded,
DatasetRenamed, DatasetDeleted). Until those exist nothing writes here.

A version is immutable: its payload sits in the object store under ``object_name`` and
is checked against ``sha256``; a job names a dataset by id and version.
"""

from __future__ import annotations

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS datasets (
        dataset_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        latest_version INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        deleted_at TEXT,
        last_seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS datasets_by_name ON datasets (name, dataset_id)",
    """CREATE TABLE IF NOT EXISTS dataset_versions (
        dataset_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        format TEXT NOT NULL,
        object_name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        uploaded_by TEXT NOT NULL,
        uploaded_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (dataset_id, version)
    )""",
)
