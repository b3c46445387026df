"""When the dispatcher's state is checkpointed, and where it is restored from.

A snapshot is taken after ``every_events`` events the reader applied, or ``interval``
seconds after the last one once the log moved on, whichever comes first. It is
encoded at once (a consistent cut of the state) and stored in the background, one at
a time; a failed store is tried again when the next one is due, the log stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import nats.errors
import structlog

from engine.dispatch import snapshot
from engine.dispatch.snapshot import SnapshotStore
from engine.dispatch.state import DispatchState

log = structlog.get_logger("tb.dispatcher")


@dataclass
class Checkpoint:
    store: SnapshotStore
    every_events: int = 10_000
    interval: float = 5.0
    saved_position: int = 0  # the reader position of the last stored snapshot
    _applied_then: int = 0  # the reader's applied count when the last snapshot was taken
    _taken_at: float = field(default_factory=time.monotonic)
    _saving: asyncio.Task[None] | None = None
    _saved: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def restore(self, last_seq: int) -> DispatchState | None:
        """The stored state, or ``None`` when there is none this log can be resumed from."""
        data = await self.store.load()
        if data is None:
            return None
        state = snapshot.decode(data)
        if state is None:
            log.warning("dispatcher.snapshot.ignored", reason="unknown format or undecodable")
            return None
        if state.position > last_seq:
            # the stream was recreated under the snapshot: it describes another history
            log.warning("dispatcher.snapshot.ignored", reason="ahead of the stream")
            return None
        self.saved_position = state.position
        return state

    def maybe_save(self, state: DispatchState, applied: int) -> None:
        """Take a snapshot when one is due and none is being stored; store it in the background.

        ``applied`` is how many events the reader has applied so far.
        """
        if self._saving is not None and not self._saving.done():
            return
        position = state.position
        if position <= self.saved_position:
            return
        elapsed = time.monotonic() - self._taken_at
        if applied - self._applied_then < self.every_events and elapsed < self.interval:
            return
        data = snapshot.encode(state)  # synchronous: no event can land halfway through
        self._applied_then = applied
        self._taken_at = time.monotonic()
        self._saving = asyncio.create_task(self._save(data, position), name="dispatcher-snapshot")

    async def _save(self, data: bytes, position: int) -> None:
        try:
            await self.store.save(data)
        except (nats.errors.Error, OSError) as err:
            log.warning("dispatcher.snapshot.failed", position=position, error=repr(err))
            return
        async with self._saved:
            self.saved_position = max(self.saved_position, position)
            self._saved.notify_all()
        log.debug("dispatcher.snapshot.saved", position=position, size=len(data))

    async def wait_saved(self, position: int) -> None:
        """Return once a snapshot at ``position`` or later is stored."""
        async with self._saved:
            await self._saved.wait_for(lambda: self.saved_position >= position)

    async def close(self) -> None:
        """Stop a store under way: the stored snapshot stays the previous, whole one."""
        if self._saving is not None:
            self._saving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._saving
