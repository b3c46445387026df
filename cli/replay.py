"""``tb replay``: rebuild the read model from the log, or ``--verify`` it at one sequence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from cli.commands import ProgressBar
from engine.bus import Bus
from projections.db import connect
from projections.read_model import applied_seq
from projections.replay import TABLES, rebuild

Rows = dict[tuple[object, ...], tuple[object, ...]]  # primary key -> row
SHOW_KEYS = 5


async def rebuild_read_model(bus: Bus, db_path: Path) -> int:
    bar = ProgressBar("replay", await bus.last_seq())
    last = await rebuild(bus, db_path, progress=bar.update)
    bar.finish()
    print(f"rebuilt {db_path} from the event log up to sequence {last}")
    return 0


async def verify_read_model(bus: Bus, db_path: Path) -> int:
    """Rebuild a scratch model up to the live model's checkpoint and compare the two.

    The live model is read in one read transaction together with its checkpoint, so
    a projector that keeps applying events meanwhile never shows as a difference.
    """
    if not db_path.exists():
        print(f"no read model at {db_path} to verify")
        return 1
    seq, live = await read_model_at_checkpoint(db_path)
    scratch = db_path.with_name(f"{db_path.name}.verify")
    try:
        bar = ProgressBar("verify", seq)
        await rebuild(bus, scratch, upto=seq, progress=bar.update)
        bar.finish()
        _, rebuilt = await read_model_at_checkpoint(scratch)
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{scratch}{suffix}").unlink()
    differences = list(differing_keys(live, rebuilt))
    if not differences:
        print(f"read model matches the event log at sequence {seq}")
        return 0
    print(f"read model DIFFERS from the event log at sequence {seq}:")
    for table, keys in differences:
        shown = ", ".join(_key(k) for k in keys[:SHOW_KEYS])
        more = f" and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
        print(f"  {table} ({TABLES[table]}): {shown}{more}")
    return 1


async def read_model_at_checkpoint(db_path: Path) -> tuple[int, dict[str, Rows]]:
    """The checkpoint and every table, read in one snapshot of the database."""
    db = await connect(db_path, readonly=True)
    try:
        await db.execute("BEGIN")  # a WAL read transaction: one consistent snapshot
        seq = await applied_seq(db)
        tables: dict[str, Rows] = {}
        for table, key in TABLES.items():
            async with db.execute(f"SELECT * FROM {table}") as cur:
                columns = [d[0] for d in cur.description]
                at = [columns.index(c.strip()) for c in key.split(",")]
                tables[table] = {
                    tuple(row[i] for i in at): tuple(row) for row in await cur.fetchall()
                }
        await db.execute("COMMIT")
        return seq, tables
    finally:
        await db.close()


def differing_keys(
    live: dict[str, Rows], rebuilt: dict[str, Rows]
) -> Iterable[tuple[str, list[tuple[object, ...]]]]:
    """Per table, the sorted keys whose rows differ (missing on one side included)."""
    for table in TABLES:
        a, b = live.get(table, {}), rebuilt.get(table, {})
        keys = sorted((k for k in a.keys() | b.keys() if a.get(k) != b.get(k)), key=repr)
        if keys:
            yield table, keys


def _key(key: tuple[object, ...]) -> str:
    return "/".join(str(part) for part in key)
