"""The dataset aggregate: pure decide/evolve over ``tb.dataset.<id>.*``.

The creator owns a dataset; only the owner (or an admin, which the caller checks)
changes it. A version is appended, never replaced: version n+1 follows version n.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypedDict

from engine.errors import Conflict, NotFound
from schemas.events import (
    DatasetCreated,
    DatasetDeleted,
    DatasetEvent,
    DatasetFormat,
    DatasetKind,
    DatasetRenamed,
    DatasetShared,
    DatasetUnshared,
    DatasetVersionUploaded,
)


@dataclass(frozen=True)
class Meta:
    """The clock and ids a decision needs: ``ids[n]`` is the id of its n-th event."""

    ids: tuple[str, str]
    at: datetime
    actor: str


@dataclass(frozen=True)
class StoredRows:
    """A version's rows as stored (``object_name`` in ``tb_datasets``) and its source file."""

    format: DatasetFormat
    object_name: str
    sha256: str
    size_bytes: int
    rows: int
    source_sha256: str
    source_size: int


@dataclass(frozen=True)
class Dataset:
    dataset_id: str = ""
    name: str = ""
    kind: DatasetKind = "targets"
    owner: str = ""
    versions: int = 0
    deleted: bool = False
    shared_with: frozenset[str] = field(default_factory=frozenset)
    version: int = 0  # stream sequence of its last event (the concurrency check)

    @property
    def exists(self) -> bool:
        return bool(self.owner)


@dataclass(frozen=True)
class CreateDataset:
    dataset_id: str
    name: str
    kind: DatasetKind
    first: StoredRows


@dataclass(frozen=True)
class UploadVersion:
    dataset_id: str
    kind: DatasetKind
    rows: StoredRows


@dataclass(frozen=True)
class RenameDataset:
    dataset_id: str
    name: str


@dataclass(frozen=True)
class DeleteDataset:
    dataset_id: str
    reason: str = ""


@dataclass(frozen=True)
class ShareDataset:
    dataset_id: str
    user_id: str


@dataclass(frozen=True)
class UnshareDataset:
    dataset_id: str
    user_id: str


DatasetCommand = (
    CreateDataset | UploadVersion | RenameDataset | DeleteDataset | ShareDataset | UnshareDataset
)


def _uploaded(
    dataset_id: str, version: int, rows: StoredRows, meta: Meta, n: int = 0
) -> DatasetVersionUploaded:
    return DatasetVersionUploaded(
        id=meta.ids[n],
        at=meta.at,
        actor=meta.actor,
        dataset_id=dataset_id,
        version=version,
        format=rows.format,
        object_name=rows.object_name,
        sha256=rows.sha256,
        size_bytes=rows.size_bytes,
        rows=rows.rows,
        source_sha256=rows.source_sha256,
        source_size=rows.source_size,
    )


class _Common(TypedDict):
    id: str
    at: datetime
    actor: str
    dataset_id: str


def decide(dataset: Dataset, cmd: DatasetCommand, meta: Meta) -> list[DatasetEvent]:
    base: _Common = {
        "id": meta.ids[0],
        "at": meta.at,
        "actor": meta.actor,
        "dataset_id": cmd.dataset_id,
    }
    if isinstance(cmd, CreateDataset):
        if dataset.exists:
            raise Conflict("dataset_id", f"dataset {cmd.dataset_id} exists")
        created = DatasetCreated(**base, name=cmd.name, kind=cmd.kind, owner=meta.actor)
        return [created, _uploaded(cmd.dataset_id, 1, cmd.first, meta, n=1)]
    if not dataset.exists or dataset.deleted:
        raise NotFound("dataset_id", f"no dataset {cmd.dataset_id}")
    match cmd:
        case UploadVersion(kind=kind, rows=rows):
            if kind != dataset.kind:
                raise Conflict("kind", f"dataset {cmd.dataset_id} holds {dataset.kind}, not {kind}")
            return [_uploaded(cmd.dataset_id, dataset.versions + 1, rows, meta)]
        case RenameDataset(name=name):
            return [] if name == dataset.name else [DatasetRenamed(**base, name=name)]
        case DeleteDataset(reason=reason):
            return [DatasetDeleted(**base, reason=reason)]
        case ShareDataset(user_id=user_id):
            if user_id in dataset.shared_with or user_id == dataset.owner:
                return []
            return [DatasetShared(**base, user_id=user_id)]
        case UnshareDataset(user_id=user_id):
            if user_id not in dataset.shared_with:
                return []
            return [DatasetUnshared(**base, user_id=user_id)]
    raise AssertionError(f"unknown command {cmd!r}")


def evolve(dataset: Dataset, event: DatasetEvent, seq: int) -> Dataset:
    match event:
        case DatasetCreated(dataset_id=dataset_id, name=name, kind=kind, owner=owner):
            dataset = Dataset(dataset_id=dataset_id, name=name, kind=kind, owner=owner)
        case DatasetVersionUploaded(version=n):
            dataset = replace(dataset, versions=max(dataset.versions, n))
        case DatasetRenamed(name=name):
            dataset = replace(dataset, name=name)
        case DatasetDeleted():
            dataset = replace(dataset, deleted=True)
        case DatasetShared(user_id=user_id):
            dataset = replace(dataset, shared_with=dataset.shared_with | {user_id})
        case DatasetUnshared(user_id=user_id):
            dataset = replace(dataset, shared_with=dataset.shared_with - {user_id})
    return replace(dataset, version=seq)


def fold(history: list[tuple[int, DatasetEvent]]) -> Dataset:
    dataset = Dataset()
    for seq, event in history:
        dataset = evolve(dataset, event, seq)
    return dataset
