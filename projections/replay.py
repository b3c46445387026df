"""Rebuild the read model from sequence 1, and dump it to compare two builds.

Run ``rebuild`` with the projector of ``db_path`` stopped: the file is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from engine.bus import Bus
from projections.db import connect
from projections.fold_process import FoldProcess, Stored
from projections.read_model import applied_seq, create_indexes, open_read_model
from projections.verify import tables

log = structlog.get_logger("tb.projections")

Progress = Callable[[int, int], None]


async def rebuild(
    bus: Bus, db_path: Path, *, progress: Progress | None = None, upto: int | None = None
) -> int:
    """Fold the stream up to its current last sequence (or ``upto``, if lower) into a
    fresh file that then replaces ``db_path``; returns the last applied sequence.
    ``progress(seq, last)`` is called after every batch."""
    target = await bus.last_seq()
    if upto is not None:
        target = min(target, upto)
    tmp = db_path.with_name(f"{db_path.name}.rebuild")
    _remove_db_files(tmp)
    db = await open_read_model(tmp, indexes=False)
    try:
        if target > 0:
            await _fold(bus, tmp, target, progress)
        last = await applied_seq(db)
        await create_indexes(db)
        # a self-contained file: no -wal to carry along when it is moved into place; the
        # checkpoint this makes (synchronous NORMAL) also syncs what the fold wrote unsynced
        await db.execute("PRAGMA journal_mode = DELETE")
    finally:
        await db.close()
    # a stale -wal next to the new file would be replayed into it
    _remove_db_files(db_path, main=False)
    os.replace(tmp, db_path)
    log.info("replay.rebuilt", db=str(db_path), last_seq=last, stream_last_seq=target)
    return last


async def _fold(bus: Bus, path: Path, target: int, progress: Progress | None) -> None:
    """Read the log here while a process of its own decodes and folds it."""
    writer = await FoldProcess.start(path)
    answers = asyncio.ensure_future(_answers(bus, writer, target, progress))
    batches = bus.read_stored(1, follow=False)
    try:
        async for msgs in batches:
            if answers.done():
                break  # the fold failed: raised below
            stored = [Stored(seq, m.subject, m.data, m.headers) for seq, m in msgs if seq <= target]
            applied_to = min(msgs[-1][0], target)
            await writer.send(stored, applied_to)
            if applied_to >= target:
                break
        writer.finish()
        await answers
    finally:
        if not answers.done():
            answers.cancel()
        await asyncio.wait([answers])
        await batches.aclose()
        await writer.close()


async def _answers(bus: Bus, writer: FoldProcess, target: int, progress: Progress | None) -> None:
    async for folded in writer.answers():
        for refused in folded.refused:  # left out of the read model, as every reader does
            m = refused.message
            await bus.quarantine_stored(m.seq, m.subject, m.data, refused.reason)
        if progress is not None:
            progress(folded.seq, target)


async def dump_tables(db_path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, ordered by primary key: equal dumps mean equal models
    (for tests; ``projections.verify`` compares large models without loading them)."""
    db = await connect(db_path, readonly=True)
    try:
        dump: dict[str, list[tuple[object, ...]]] = {}
        for table, key in (await tables(db)).items():
            order = ", ".join(key)
            async with db.execute(f'SELECT * FROM "{table}" ORDER BY {order}') as cur:
                dump[table] = [tuple(row) for row in await cur.fetchall()]
        return dump
    finally:
        await db.close()


def _remove_db_files(path: Path, *, main: bool = True) -> None:
    names = [f"{path}-wal", f"{path}-shm"] + ([str(path)] if main else [])
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)
