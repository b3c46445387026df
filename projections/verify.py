"""Compare two read models table by table, row by row, in primary-key order.

Both sides are read in batches and merged, so two models of a million rows each are
compared without either sitting in memory. Every table of the read model takes part
(found in the schema, not listed by hand), so a table added later is verified too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import aiosqlite

BATCH = 2000
SKIPPED = ("checkpoints",)  # compared as the sequence both models were built to

Row = tuple[object, ...]


@dataclass
class RowDifference:
    """One key whose rows differ: present on one side only, or with these columns."""

    key: Row
    live: Row | None
    rebuilt: Row | None
    columns: list[str] = field(default_factory=list)  # differing columns when on both


@dataclass
class TableDifference:
    table: str
    key: list[str]
    columns: list[str]
    count: int = 0  # keys that differ
    shown: list[RowDifference] = field(default_factory=list)  # the first few of them
    schema: str = ""  # when the tables themselves differ: how (rows are not compared)


async def tables(db: aiosqlite.Connection) -> dict[str, list[str]]:
    """Every table of the read model with its primary-key columns (``rowid`` if none)."""
    names = await db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    )
    found: dict[str, list[str]] = {}
    for (name,) in names:
        if name in SKIPPED:
            continue
        info = await db.execute_fetchall(f'PRAGMA table_info("{name}")')
        pk = sorted((int(row[5]), str(row[1])) for row in info if row[5])
        found[str(name)] = [column for _, column in pk] or ["rowid"]
    return found


async def count_rows(db: aiosqlite.Connection, names: Iterable[str]) -> int:
    total = 0
    for name in names:
        [(n,)] = await db.execute_fetchall(f'SELECT COUNT(*) FROM "{name}"')
        total += int(n)
    return total


async def compare(
    live: aiosqlite.Connection,
    rebuilt: aiosqlite.Connection,
    *,
    show: int = 5,
    progress: Callable[[int], None] | None = None,
) -> list[TableDifference]:
    """The tables whose rows differ; ``progress(rows)`` after each batch of the live side."""
    ours, theirs = await tables(live), await tables(rebuilt)
    found: list[TableDifference] = []
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in theirs or name not in ours:
            side = "the read model" if name in ours else "the rebuild from the log"
            key = ours.get(name) or theirs[name]
            found.append(TableDifference(name, key, [], count=1, schema=f"only in {side}"))
            continue
        diff = await _compare_table(live, rebuilt, name, ours[name], show, progress)
        if diff.count:
            found.append(diff)
    return found


async def _compare_table(
    live: aiosqlite.Connection,
    rebuilt: aiosqlite.Connection,
    name: str,
    key: list[str],
    show: int,
    progress: Callable[[int], None] | None,
) -> TableDifference:
    order = ", ".join(f'"{c}"' if c != "rowid" else c for c in key)
    select = f'SELECT {order}, * FROM "{name}" ORDER BY {order}'
    width = len(key)
    async with live.execute(select) as a, rebuilt.execute(select) as b:
        columns = [d[0] for d in a.description][width:]
        diff = TableDifference(name, key, columns)
        other = [d[0] for d in b.description][width:]
        if other != columns:
            diff.count, diff.schema = 1, f"columns {columns} in the read model, {other} rebuilt"
            return diff
        left, right = _rows(a, progress), _rows(b, None)
        x, y = await anext(left, None), await anext(right, None)
        while x is not None or y is not None:
            match _first(x, y, width):
                case "live":
                    assert x is not None
                    _record(diff, RowDifference(x[:width], x[width:], None), show)
                    x = await anext(left, None)
                case "rebuilt":
                    assert y is not None
                    _record(diff, RowDifference(y[:width], None, y[width:]), show)
                    y = await anext(right, None)
                case _:
                    assert x is not None and y is not None
                    a_row, b_row = x[width:], y[width:]
                    if a_row != b_row:
                        pairs = zip(columns, a_row, b_row, strict=True)
                        changed = [c for c, p, q in pairs if p != q]
                        _record(diff, RowDifference(x[:width], a_row, b_row, changed), show)
                    x, y = await anext(left, None), await anext(right, None)
    return diff


def _first(x: Row | None, y: Row | None, width: int) -> str:
    """Which side's row comes first in key order: "live", "rebuilt" or "both" (same key)."""
    if y is None:
        return "live"
    if x is None:
        return "rebuilt"
    kx, ky = _sort_key(x[:width]), _sort_key(y[:width])
    return "live" if kx < ky else "rebuilt" if ky < kx else "both"


def _record(diff: TableDifference, row: RowDifference, show: int) -> None:
    diff.count += 1
    if len(diff.shown) < show:
        diff.shown.append(row)


async def _rows(
    cursor: aiosqlite.Cursor, progress: Callable[[int], None] | None
) -> AsyncIterator[Row]:
    while batch := list(await cursor.fetchmany(BATCH)):
        for row in batch:
            yield tuple(row)
        if progress is not None:
            progress(len(batch))


def _sort_key(key: Row) -> tuple[tuple[int, object], ...]:
    """SQLite's order of keys: NULL, then numbers, then text (byte order), then blobs."""
    return tuple(
        (0, 0)
        if part is None
        else (1, part)
        if isinstance(part, int | float)
        else (2, part)
        if isinstance(part, str)
        else (3, part)
        for part in key
    )
