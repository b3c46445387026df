"""``tb replay``: rebuild the read model from the log, or ``--verify`` it at one sequence."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cli.commands import ProgressBar
from engine.bus import Bus
from projections.db import connect
from projections.read_model import applied_seq
from projections.replay import rebuild
from projections.verify import RowDifference, TableDifference, compare, count_rows, tables

SHOW_KEYS = 5
VALUE_CHARS = 60


async def rebuild_read_model(bus: Bus, db_path: Path) -> int:
    bar = ProgressBar("replay", await bus.last_seq())
    last = await rebuild(bus, db_path, progress=bar.update)
    bar.finish()
    print(f"rebuilt {db_path} from the event log up to sequence {last}")
    return 0


async def verify_read_model(bus: Bus, db_path: Path) -> int:
    """Rebuild a scratch model up to the live model's checkpoint and compare the two.

    The live model is read in one read transaction, begun before its checkpoint is read
    and held until the comparison ends, so a projector that keeps applying events
    meanwhile never shows as a difference.
    """
    if not db_path.exists():
        print(f"no read model at {db_path} to verify")
        return 1
    scratch = db_path.with_name(f"{db_path.name}.verify")
    try:
        live = await connect(db_path, readonly=True)
    except sqlite3.DatabaseError as err:
        print(f"{db_path} is not a read model ({err})")
        return 1
    try:
        await live.execute("BEGIN")  # a WAL read transaction: one consistent snapshot
        try:
            seq = await applied_seq(live)
        except sqlite3.DatabaseError as err:
            print(f"{db_path} is not a read model ({err})")
            return 1
        bar = ProgressBar("verify: rebuild", seq)
        rebuilt_to = await rebuild(bus, scratch, upto=seq, progress=bar.update)
        bar.finish()
        if rebuilt_to != seq:
            print(f"the event log ends at sequence {rebuilt_to}, the read model is at {seq}")
            return 1
        rebuilt = await connect(scratch, readonly=True)
        try:
            bar = ProgressBar("verify: compare", await count_rows(live, await tables(live)))
            rows = 0

            def compared(n: int) -> None:
                nonlocal rows
                rows += n
                bar.update(rows)

            differences = await compare(live, rebuilt, show=SHOW_KEYS, progress=compared)
            bar.finish()
        finally:
            await rebuilt.close()
        await live.execute("COMMIT")
    finally:
        await live.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{scratch}{suffix}").unlink()
    if not differences:
        print(f"read model matches the event log at sequence {seq}")
        return 0
    print(f"read model DIFFERS from the event log at sequence {seq}:")
    for diff in differences:
        for line in describe(diff):
            print(line)
    return 1


def describe(diff: TableDifference) -> Iterator[str]:
    """A table's differences as lines: a summary naming the keys, then each shown row."""
    key = ", ".join(diff.key)
    if diff.schema:
        yield f"  {diff.table} ({key}): the table differs: {diff.schema}"
        return
    shown = ", ".join(_key(row.key) for row in diff.shown)
    more = f" and {diff.count - len(diff.shown)} more" if diff.count > len(diff.shown) else ""
    yield f"  {diff.table} ({key}): {shown}{more}"
    for row in diff.shown:
        yield f"    {_key(row.key)}: {_row(diff.columns, row)}"


def _row(columns: list[str], row: RowDifference) -> str:
    if row.rebuilt is None:
        return "only in the read model: the log has no such row"
    if row.live is None:
        return "missing from the read model: the log has it"
    changes = []
    for column in row.columns:
        i = columns.index(column)
        changes.append(
            f"{column} is {_value(row.live[i])} in the read model,"
            f" {_value(row.rebuilt[i])} from the log"
        )
    return "; ".join(changes)


def _value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= VALUE_CHARS else f"{text[: VALUE_CHARS - 3]}..."


def _key(key: tuple[object, ...]) -> str:
    return "/".join(str(part) for part in key)
