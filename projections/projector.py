"""Keeps the read model current: follows the log from the checkpoint, applies batches, notifies.

The read loop is watched: ordered consumers can stop delivering without an error
(missed heartbeats), so when the stream is ahead and the checkpoint stops moving,
the loop is restarted from the checkpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiosqlite
import nats.errors
import structlog

from engine.bus import Bus
from engine.cancellation import raise_if_cancelled, stop_task
from projections.inline import BatchWriter
from projections.read_model import ProjectionUpdate, applied_seq, apply_batch, open_read_model

log = structlog.get_logger("tb.projections")

__all__ = ["ProjectionUpdate", "Projector", "ProjectorFailed"]

MAX_STALL_AFTER = 300.0
STOP_GRACE = 10.0  # a read loop that ignores its cancel must not hang shutdown


class ProjectorFailed(RuntimeError):
    """The projector stopped on an error; the read model will not reach the sequence."""


class Projector:
    def __init__(
        self,
        bus: Bus,
        db_path: Path,
        *,
        stall_after: float = 10.0,
        check_every: float = 2.0,
        queue_size: int = 1000,
    ) -> None:
        """``stall_after``: seconds behind the stream without progress before the read
        loop restarts; ``check_every``: how often the stream's last sequence is read;
        ``queue_size``: per subscriber, the oldest update is dropped when it is full."""
        self.bus, self.db_path = bus, db_path
        self._stall_after, self._check_every, self._queue_size = (
            stall_after,
            check_every,
            queue_size,
        )
        self._db: aiosqlite.Connection | None = None
        self._writer: BatchWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._position = 0
        self._error: BaseException | None = None
        self._changed = asyncio.Condition()
        self._queues: set[asyncio.Queue[ProjectionUpdate]] = set()
        self._listeners: list[Callable[[ProjectionUpdate], None]] = []
        self.restarts = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the read model and follow the log; after a failure, ``stop()`` first."""
        if self._task is not None:
            return
        self._db = await open_read_model(self.db_path)
        self._writer = BatchWriter(self.db_path)
        self._position = await applied_seq(self._db)
        self._error = None
        self._task = asyncio.create_task(self._supervise(), name="projector")
        log.info("projector.started", db=str(self.db_path), position=self._position)

    async def stop(self) -> None:
        """Idempotent; a batch in flight is rolled back and applied again on the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            _, still = await asyncio.wait([task], timeout=STOP_GRACE)
            if still:
                log.error("projector.stop_timeout", grace=STOP_GRACE)
            elif not task.cancelled():
                task.exception()  # already logged and kept in ``failure``
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()  # after a batch still applying in its thread
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> Projector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- reading the projector ----------------------------------------------------------

    @property
    def position(self) -> int:
        """The last stream sequence applied and committed."""
        return self._position

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self._error is None

    @property
    def failure(self) -> BaseException | None:
        """What stopped the projector, for ``/readyz``."""
        return self._error

    @property
    def db(self) -> aiosqlite.Connection:
        """The writer's connection. Queries from other tasks should open their own
        (``projections.db.connect(path, readonly=True)``) so they never see a batch
        half-applied."""
        if self._db is None:
            raise RuntimeError("projector not started")
        return self._db

    def subscribe(self) -> asyncio.Queue[ProjectionUpdate]:
        queue: asyncio.Queue[ProjectionUpdate] = asyncio.Queue(self._queue_size)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[ProjectionUpdate]) -> None:
        self._queues.discard(queue)

    def listen(self, listener: Callable[[ProjectionUpdate], None]) -> None:
        """Call ``listener`` with every update, right after its batch commits. It must
        return at once (merge the update and wake its own task): it runs in the read loop,
        and unlike a queue it is never dropped from, so nothing it is told goes missing."""
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[ProjectionUpdate], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def wait_for(self, seq: int, timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``seq`` is applied; ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._position >= seq or self._error is not None)
        if self._position < seq:
            raise ProjectorFailed(f"projector failed before sequence {seq}") from self._error

    # -- the loop -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        stall_after = self._stall_after
        try:
            while True:
                restarted_at = self._position
                reader = asyncio.create_task(self._follow(), name="projector.read")
                try:
                    await self._watch(reader, stall_after)
                finally:
                    await stop_task(reader)
                self.restarts += 1
                # a reader that stalls again without any progress: back off, don't spin
                no_progress = self._position == restarted_at
                stall_after = (
                    min(stall_after * 2, MAX_STALL_AFTER) if no_progress else self._stall_after
                )
        except Exception as err:
            log.exception("projector.failed", position=self._position)
            self._error = err
            async with self._changed:
                self._changed.notify_all()
            raise

    async def _watch(self, reader: asyncio.Task[None], stall_after: float) -> None:
        """Return when the reader stalls; raise what the reader raised."""
        loop = asyncio.get_running_loop()
        behind_since: float | None = None
        behind_at = -1
        while True:
            raise_if_cancelled()
            done, _ = await asyncio.wait([reader], timeout=self._check_every)
            if done:
                reader.result()
                raise RuntimeError("event reader ended")
            try:
                last = await self.bus.last_seq()
            except (nats.errors.Error, TimeoutError) as err:
                log.warning("projector.last_seq_unavailable", error=repr(err))
                continue
            now, position = loop.time(), self._position
            if last <= position:
                behind_since = None
            elif behind_since is None or position != behind_at:
                behind_since, behind_at = now, position
            elif now - behind_since >= stall_after:
                log.warning(
                    "projector.stalled", position=position, last_seq=last, restart=self.restarts + 1
                )
                return

    async def _follow(self) -> None:
        db, writer = self.db, self._writer
        assert writer is not None  # started
        # the checkpoint on disk, not the counter: a commit can land after a cancel
        start = await applied_seq(db) + 1
        # quarantined messages are left out of a batch, and its last_seq moves past them
        batches = self.bus.read_batches(start, follow=True)
        try:
            async for batch in batches:
                # one thread hop per batch, not one per statement (projections.inline)
                update = await writer.run(apply_batch, batch.envelopes, batch.last_seq)
                if update is not None:
                    await self._advance(update)
        finally:
            await batches.aclose()  # unsubscribes its consumer now, not at GC

    async def _advance(self, update: ProjectionUpdate) -> None:
        async with self._changed:
            self._position = update.seq
            self._changed.notify_all()
        for queue in self._queues:
            if queue.full():
                # a slow listener loses its oldest update rather than stalling the projector
                queue.get_nowait()
                log.warning("projector.listener_lagging", seq=update.seq)
            queue.put_nowait(update)
        for listener in self._listeners:
            listener(update)
