"""A key-value bucket's records held in memory and followed, so every replica answers from
what the bucket holds now: a put or a delete on one replica reaches the others within
the watch's latency.

A value that does not decode counts as absent (a session or key nobody can read grants
nothing) and is logged once per revision; the watch goes on. A NATS error restarts the
watch after a short pause, which replays the bucket's current content.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, ItemsView
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from engine.cancellation import stop_task

log = structlog.get_logger("tb.kv")

T = TypeVar("T")
READY_WITHIN = 10.0  # seconds the bucket's current content may take to arrive at start
RESTART_AFTER = 0.5  # seconds between a failed watch and the next


@dataclass
class KvMirror(Generic[T]):
    kv: KeyValue
    decode: Callable[[bytes], T]
    name: str  # for logs and the watch task
    # called with (key, record, fresh): fresh when the key was not held before
    on_put: Callable[[str, T, bool], None] | None = None
    on_delete: Callable[[str, T], None] | None = None
    records: dict[str, T] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        """Follow the bucket; returns once its current content is held."""
        self._ready.clear()
        self._task = asyncio.create_task(self._follow(), name=f"{self.name}-watch")
        await asyncio.wait_for(self._ready.wait(), timeout=READY_WITHIN)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)

    def get(self, key: str) -> T | None:
        return self.records.get(key)

    def items(self) -> ItemsView[str, T]:
        return self.records.items()

    def hold(self, key: str, record: T) -> None:
        """What this replica itself just wrote, before its watch brings it back."""
        self.records[key] = record

    def forget(self, key: str) -> None:
        record = self.records.pop(key, None)
        if record is not None and self.on_delete is not None:
            self.on_delete(key, record)

    def _put(self, key: str, value: bytes, revision: int) -> None:
        try:
            record = self.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.warning(
                "kv.undecodable", bucket=self.name, key=key, revision=revision, error=str(err)
            )
            self.forget(key)
            return
        fresh = key not in self.records
        self.records[key] = record
        if self.on_put is not None:
            self.on_put(key, record, fresh)

    async def _follow(self) -> None:
        while True:
            try:
                watcher = await self.kv.watchall()
                seen: set[str] | None = set()  # keys the bucket holds as the watch begins
                try:
                    async for entry in watcher:
                        if entry is None:  # the end of what the bucket held at the start
                            if seen is not None:  # gone while no watch ran
                                for key in self.records.keys() - seen:
                                    self.forget(key)
                            seen = None
                            self._ready.set()
                            continue
                        if seen is not None:
                            seen.add(entry.key)
                        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                            self.forget(entry.key)
                        else:
                            self._put(entry.key, entry.value, entry.revision or 0)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                raise
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
                log.warning("kv.watch_restart", bucket=self.name, error=str(err))
                await asyncio.sleep(RESTART_AFTER)
