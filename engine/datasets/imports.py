"""One path from a received file to a stored version, for chunked uploads and for the
single-request import: parse (in a worker thread: it is CPU work), refuse with the
problems found, else store the rows and append the version."""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.bus import Bus
from engine.datasets.columns import check_format
from engine.datasets.decider import CreateDataset, StoredRows, UploadVersion
from engine.datasets.parse import Parsed, parse_file
from engine.datasets.service import DatasetCommands, dataset_id_for
from engine.datasets.tables import Problem
from engine.datasets.uploads import Finished
from engine.datasets.versions import store_rows
from engine.devices import DeviceCatalogues
from schemas.device_catalogue import DeviceCatalogue, ShippedCatalogues
from schemas.events import DatasetFormat, DatasetKind


class RowsRefused(Exception):
    """The file has bad rows (or cannot be read): nothing was stored."""

    def __init__(self, errors: list[Problem]) -> None:
        super().__init__(f"{len(errors)} problem(s), first: {errors[0].field}: {errors[0].rule}")
        self.errors = errors


@dataclass(frozen=True)
class Source:
    """A received file: where it is on disk and what it is."""

    path: Path
    kind: DatasetKind
    format: DatasetFormat
    sha256: str
    size: int


def _parse(source: Source, out_path: Path, catalogue: DeviceCatalogue | None) -> Parsed:
    with open(out_path, "wb") as out:
        return parse_file(source.path, source.kind, source.format, out, catalogue)


async def import_file(
    bus: Bus,
    source: Source,
    *,
    name: str,
    actor: str,
    command_id: str,
    dataset_id: str | None = None,
    shipped: ShippedCatalogues | None = None,
) -> Finished:
    """Store ``source`` as a new dataset (``dataset_id`` None: its id follows from
    ``command_id``, so a retry names the same one) or as its next version. Device
    profiles must name devices of the catalogue in use (``shipped``: the versions this
    process has)."""
    check_format(source.kind, source.format)
    catalogue = None
    if source.kind == "devices":
        devices = DeviceCatalogues(bus, shipped or ShippedCatalogues())
        catalogue = devices.content(await devices.in_use())
    creating = dataset_id is None
    dataset_id = dataset_id or dataset_id_for(command_id)
    with tempfile.TemporaryDirectory(prefix="tb-import-") as tmp:
        rows_path = Path(tmp) / "rows.jsonl"
        parsed = await asyncio.to_thread(_parse, source, rows_path, catalogue)
        if parsed.errors:
            raise RowsRefused(parsed.errors)
        object_name = await store_rows(bus, rows_path, dataset_id, parsed.sha256)
    stored = StoredRows(
        format=source.format,
        object_name=object_name,
        sha256=parsed.sha256,
        size_bytes=parsed.size,
        rows=parsed.rows,
        source_sha256=source.sha256,
        source_size=source.size,
    )
    commands = DatasetCommands(bus)
    cmd: CreateDataset | UploadVersion
    if creating:
        cmd = CreateDataset(dataset_id, name, source.kind, stored)
    else:
        cmd = UploadVersion(dataset_id, source.kind, stored)
    _, appended = await commands.execute(cmd, actor, command_id)
    version = await commands.stored_by(dataset_id, command_id)
    warnings = parsed.warnings
    if parsed.more_warnings:
        more = Problem(0, "", f"{parsed.more_warnings} more duplicate rows, each kept once", "file")
        warnings = [*warnings, more]
    return Finished(dataset_id, version.version, version.rows, warnings, appended.seq)
