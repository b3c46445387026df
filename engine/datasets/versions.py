"""Stored versions: a version's rows as JSON lines in the ``tb_datasets`` object store,
named by their dataset and sha256, so a dataset stores one content once and it never
changes; a deleted dataset's objects are collected (``engine.datasets.collector``).

``load_version`` is how the engine (a job naming ``{id, version}``) reads the rows back.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import nats.js.errors

from engine.bus import Bus
from engine.datasets.service import DatasetCommands
from schemas import subjects
from schemas.datasets import ROW_TYPES, Row
from schemas.events import DatasetKind


class VersionCorrupt(Exception):
    """The stored rows do not hash to what the version recorded."""


async def store_rows(bus: Bus, path: Path, dataset_id: str, sha256: str) -> str:
    """Put the rows file into the object store under the dataset's name for its content
    (once)."""
    store = await bus.js.object_store(subjects.DATASETS_BUCKET)
    name = subjects.dataset_object_name(dataset_id, sha256)
    try:
        await store.get_info(name)
    except nats.js.errors.ObjectNotFoundError:
        with path.open("rb") as f:
            await store.put(name, f)
    return name


class _Hashing:
    """A file the object store writes into, hashing what it writes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)


async def fetch_rows(bus: Bus, object_name: str, sha256: str, out: BinaryIO) -> None:
    """Write the stored rows into ``out``, checked against the version's sha256."""
    store = await bus.js.object_store(subjects.DATASETS_BUCKET)
    sink = _Hashing(out)
    await store.get(object_name, writeinto=sink)  # type: ignore[arg-type]
    if sink.digest.hexdigest() != sha256:
        raise VersionCorrupt(f"{object_name}: sha256 differs from the version's")


def read_rows(path: Path, kind: DatasetKind) -> Iterator[Row]:
    """The rows of a fetched file, one line at a time."""
    decoder = msgspec.json.Decoder(ROW_TYPES[kind])
    with open(path, "rb") as f:
        for line in f:
            yield decoder.decode(line)


@dataclass(frozen=True)
class LoadedVersion:
    dataset_id: str
    version: int
    kind: DatasetKind
    rows: list[Row]


@contextlib.asynccontextmanager
async def opened_version(
    bus: Bus, dataset_id: str, version: int
) -> AsyncIterator[tuple[DatasetKind, Iterator[Row]]]:
    """One version's kind and its rows, read one at a time from a local copy (for a
    version too large to hold): ``async with opened_version(...) as (kind, rows)``."""
    commands = DatasetCommands(bus)
    dataset = await commands.load(dataset_id)
    uploaded = await commands.version(dataset_id, version)
    with tempfile.TemporaryDirectory(prefix="tb-dataset-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        with path.open("wb") as out:
            await fetch_rows(bus, uploaded.object_name, uploaded.sha256, out)
        yield dataset.kind, read_rows(path, dataset.kind)


async def load_version(bus: Bus, dataset_id: str, version: int) -> LoadedVersion:
    """Every row of one version of a dataset (``NotFound`` naming what is missing),
    checked against the sha256 the version recorded; a deleted dataset's versions too,
    until its objects are collected."""
    async with opened_version(bus, dataset_id, version) as (kind, rows):
        return LoadedVersion(dataset_id, version, kind, list(rows))
