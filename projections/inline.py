"""Folding a batch into SQLite in one worker-thread call instead of a thread hop per
statement.

The projection modules are written against aiosqlite (``await db.execute(...)``), where
every statement is a round trip to the connection's thread: at thousands of events a
second that round trip, not SQLite, is most of the cost of a batch. ``InlineDatabase``
offers the same calls over a plain ``sqlite3`` connection and never suspends, so a whole
``apply_batch`` coroutine runs start to end inside one ``asyncio.to_thread`` call
(``run_inline``). A projection that awaited anything else (the bus, a sleep) would
suspend: ``run_inline`` refuses it rather than block on it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import aiosqlite

T = TypeVar("T")

Params = Sequence[Any] | Mapping[str, Any]


class InlineCursor:
    """The part of ``aiosqlite.Cursor`` projections use."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def description(self) -> Any:
        return self._cursor.description

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size) if size is not None else self._cursor.fetchmany()

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _Done:
    """What ``execute`` answers: awaitable, or an async context manager, finished at once."""

    def __init__(self, cursor: InlineCursor) -> None:
        self._cursor = cursor

    def __await__(self) -> Generator[Any, None, InlineCursor]:
        return self._cursor
        yield  # a generator that returns before its first yield: it never suspends

    async def __aenter__(self) -> InlineCursor:
        return self._cursor

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._cursor.close()


class InlineDatabase:
    """The part of ``aiosqlite.Connection`` projections use, over a ``sqlite3`` connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, parameters: Params = ()) -> _Done:
        return _Done(InlineCursor(self.conn.execute(sql, parameters)))

    async def executemany(self, sql: str, parameters: Iterable[Params]) -> InlineCursor:
        return InlineCursor(self.conn.executemany(sql, parameters))

    async def execute_fetchall(self, sql: str, parameters: Params = ()) -> list[Any]:
        return self.conn.execute(sql, parameters).fetchall()


def as_connection(db: InlineDatabase) -> aiosqlite.Connection:
    """The projections take an ``aiosqlite.Connection``; this offers every call of it
    they make (``execute``, also as a context manager, ``executemany``,
    ``execute_fetchall``, ``in_transaction``)."""
    return cast(aiosqlite.Connection, db)


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, here and now."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a projection awaited something other than its database")


class BatchWriter:
    """A plain ``sqlite3`` writer connection with a thread of its own: folds run there
    one after another, in the order asked. A caller that is cancelled does not stop its
    fold, which commits or rolls back on its own before the next one (or ``close``) runs.
    """

    def __init__(self, path: Path) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tb-fold")
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("synchronous = NORMAL", "foreign_keys = ON", "busy_timeout = 5000"):
            self._conn.execute(f"PRAGMA {pragma}")
        self.db = InlineDatabase(self._conn)

    async def run(self, fold: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """``fold(db, *args)`` to its end in the writer's thread (``db`` the inline one)."""
        db = as_connection(self.db)
        return await asyncio.wrap_future(self._thread.submit(lambda: run_inline(fold(db, *args))))

    async def close(self) -> None:
        closed = asyncio.wrap_future(self._thread.submit(self._conn.close))
        await asyncio.shield(closed)  # after any fold still running
        self._thread.shutdown(wait=False)
