"""Collecting deleted datasets' stored rows: once ``DatasetDeleted`` is in the log, the
objects its versions name are removed from ``tb_datasets``.

The delete's answer never waits for it: the engine follows ``tb.dataset.>`` and removes
a deleted dataset's objects after the fact, waiting NATS trouble out with back-off.
Removing an object can be done again (``engine.objects.remove_object``), so a process
that dies between the event and the removal, or half-way through one, is healed by the
sweep every start begins with: it reads every dataset's history and removes what every
deleted dataset left, including objects stored under a deleted dataset's name that no
event names (a version stored while its dataset was being deleted).

An object stored before objects were named per dataset (``rows/<sha256>.jsonl``, one
content stored once) may be named by several datasets: it goes only when every dataset
naming it is deleted.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import nats.js.errors
import structlog

from engine.bus import Bus
from engine.objects import remove_object
from engine.transient import Backoff, is_transient, until_done
from schemas import subjects
from schemas.events import DatasetDeleted, DatasetVersionUploaded, Event

log = structlog.get_logger("tb.datasets")
T = TypeVar("T")


@dataclass
class StoredObjects:
    """What the log says of the objects in ``tb_datasets``: which datasets name each,
    which datasets are deleted. Pure: folding events and answering questions."""

    named_by: dict[str, set[str]] = field(default_factory=dict)  # object -> dataset ids
    names: dict[str, set[str]] = field(default_factory=dict)  # dataset id -> objects
    deleted: set[str] = field(default_factory=set)

    def apply(self, event: Event) -> str | None:
        """Fold one event in; the id of a dataset it deletes."""
        match event:
            case DatasetVersionUploaded(dataset_id=dataset_id, object_name=name):
                self.named_by.setdefault(name, set()).add(dataset_id)
                self.names.setdefault(dataset_id, set()).add(name)
            case DatasetDeleted(dataset_id=dataset_id):
                self.deleted.add(dataset_id)
                return dataset_id
        return None

    def collectable(self, dataset_ids: Iterable[str]) -> list[str]:
        """The objects these datasets name that no dataset still in use names."""
        found = {name for d in dataset_ids for name in self.names.get(d, ())}
        return sorted(name for name in found if self.named_by[name] <= self.deleted)

    def left_behind(self, name: str) -> bool:
        """Whether an object found in the bucket is one a deleted dataset left: named only
        by deleted datasets, or stored under a deleted dataset's name."""
        named_by = self.named_by.get(name)
        if named_by is not None:
            return named_by <= self.deleted
        owner = subjects.dataset_of_object(name)
        return owner is not None and owner in self.deleted


@dataclass
class DatasetCollector:
    bus: Bus
    objects: StoredObjects = field(default_factory=StoredObjects)
    backoff: Backoff = field(default_factory=lambda: Backoff("dataset-collector"))
    removed: list[str] = field(default_factory=list)  # object names, in order
    swept: asyncio.Event = field(default_factory=asyncio.Event)  # the start's sweep is done
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    _collected: set[str] = field(default_factory=set)

    async def run(self) -> None:
        position = await self._retrying(self.sweep)
        while True:
            try:
                async for batch in self.bus.read_batches(position + 1, subjects.ALL_DATASETS):
                    for env in batch.envelopes:
                        deleted = self.objects.apply(env.event)
                        if deleted is not None:
                            await self._retrying(functools.partial(self.collect, [deleted]))
                    position = batch.last_seq
            except Exception as err:
                if not is_transient(err, self.bus.nc):
                    raise
                await self.backoff.failed(err)

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        return await until_done(step, self.backoff, self.bus.nc)

    async def sweep(self) -> int:
        """Fold every dataset event so far and remove what deleted datasets left; the
        stream sequence read up to."""
        self.objects = StoredObjects()
        position = 0
        async for batch in self.bus.read_batches(1, subjects.ALL_DATASETS, follow=False):
            for env in batch.envelopes:
                self.objects.apply(env.event)
            position = batch.last_seq
        store = await self.bus.js.object_store(subjects.DATASETS_BUCKET)
        try:
            found = await store.list()
        except nats.js.errors.NotFoundError:
            found = []  # an empty bucket
        left = sorted({info.name for info in found if self.objects.left_behind(info.name)})
        await self._remove(left)
        await self._done(self.objects.deleted)
        self.swept.set()
        return position

    async def collect(self, dataset_ids: list[str]) -> None:
        """Remove the objects of these deleted datasets that no dataset in use names."""
        await self._remove(self.objects.collectable(dataset_ids))
        await self._done(dataset_ids)

    async def _remove(self, names: list[str]) -> None:
        for name in names:
            if await remove_object(self.bus, subjects.DATASETS_BUCKET, name):
                self.removed.append(name)
                log.info("dataset.object_removed", object=name)

    async def _done(self, dataset_ids: Iterable[str]) -> None:
        async with self._progress:
            self._collected.update(dataset_ids)
            self._progress.notify_all()

    async def wait_collected(self, dataset_id: str) -> None:
        """Return once the objects of ``dataset_id`` (deleted) have been collected."""
        async with self._progress:
            await self._progress.wait_for(lambda: dataset_id in self._collected)
