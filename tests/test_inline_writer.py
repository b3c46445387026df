"""The batch writer: a fold runs whole in the writer's thread, in order, and a caller's
cancel neither tears a transaction nor lets the next fold overlap it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import aiosqlite
import pytest

from projections.db import transaction
from projections.inline import BatchWriter, run_inline


async def _setup(db: aiosqlite.Connection) -> None:
    await db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, thread TEXT)")


Gate = tuple[threading.Event, threading.Event]  # (the fold started, the test lets it go on)


async def _insert(db: aiosqlite.Connection, ns: list[int], gate: Gate | None) -> int:
    async with transaction(db):
        for n in ns:
            if gate is not None:
                gate[0].set()
                gate[1].wait(5)  # hold the fold in its thread until the test lets it go
            cur = await db.execute(
                "INSERT INTO t (n, thread) VALUES (?, ?)", (n, threading.current_thread().name)
            )
            assert cur.rowcount == 1
    async with db.execute("SELECT COUNT(*) FROM t") as cur:
        [(count,)] = await cur.fetchall()
    rows = await db.execute_fetchall("SELECT MAX(n) FROM t")
    assert next(iter(rows))[0] == max(ns)
    return int(count)


async def test_folds_run_in_the_writers_thread_in_order(tmp_path: Path) -> None:
    writer = BatchWriter(tmp_path / "w.db")
    try:
        await writer.run(_setup)
        counts = await asyncio.gather(*(writer.run(_insert, [n], None) for n in range(1, 51)))
        assert counts == list(range(1, 51))  # each saw every fold asked before it
    finally:
        await writer.close()
    async with aiosqlite.connect(tmp_path / "w.db") as db:
        threads = {row[0] for row in await db.execute_fetchall("SELECT thread FROM t")}
    assert len(threads) == 1 and threads.pop().startswith("tb-fold")


async def test_a_cancelled_caller_leaves_its_fold_to_finish_before_the_next(
    tmp_path: Path,
) -> None:
    writer = BatchWriter(tmp_path / "w.db")
    started, go_on = threading.Event(), threading.Event()
    try:
        await writer.run(_setup)
        first = asyncio.ensure_future(writer.run(_insert, [1, 2, 3], (started, go_on)))
        assert await asyncio.to_thread(started.wait, 5)  # running in the writer's thread
        first.cancel()
        second = asyncio.ensure_future(writer.run(_insert, [4], None))
        go_on.set()
        assert await second == 4  # ran after the cancelled fold committed, never inside it
        assert first.cancelled()
    finally:
        await writer.close()


async def test_a_fold_that_awaits_anything_but_its_database_is_refused() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="awaited something other than its database"):
        run_inline(suspends())
