"""A deleted dataset's stored rows leave the object store: after the fact (the delete never
waits), by the engine following the log, and by the sweep each start begins with when a
process died between the event and the removal, or in the middle of one."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bus import Bus
from engine.datasets.collector import DatasetCollector, StoredObjects
from engine.datasets.decider import CreateDataset, DeleteDataset, StoredRows
from engine.datasets.imports import Source, import_file
from engine.datasets.service import DatasetCommands
from engine.objects import remove_object
from schemas import subjects
from schemas.events import DatasetDeleted, DatasetVersionUploaded

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0
AT = datetime(2026, 1, 1, tzinfo=UTC)
OBJECTS_STREAM = f"OBJ_{subjects.DATASETS_BUCKET}"


async def imported(
    bus: Bus, tmp_path: Path, body: bytes, key: str, dataset_id: str | None = None
) -> str:
    """A targets dataset (or its next version) from a csv; its id."""
    path = tmp_path / f"{key}.csv"
    path.write_bytes(body)
    digest = hashlib.sha256(body).hexdigest()
    source = Source(path, "targets", "csv", digest, len(body))
    finished = await import_file(
        bus, source, name=key, actor="ann", command_id=key, dataset_id=dataset_id
    )
    return finished.dataset_id


async def objects_of(bus: Bus, dataset_id: str) -> list[str]:
    return [
        env.event.object_name
        for env in await bus.load(subjects.dataset_stream_filter(dataset_id))
        if isinstance(env.event, DatasetVersionUploaded)
    ]


async def in_bucket(bus: Bus) -> set[str]:
    """The objects in the bucket, deletion markers included."""
    store = await bus.js.object_store(subjects.DATASETS_BUCKET)
    try:
        return {info.name for info in await store.list()}
    except nats.js.errors.NotFoundError:
        return set()


async def messages(bus: Bus) -> int:
    """What the bucket's stream holds: a chunk and a meta message per small object."""
    return int((await bus.js.stream_info(OBJECTS_STREAM)).state.messages)


async def delete(bus: Bus, dataset_id: str) -> None:
    await DatasetCommands(bus).execute(DeleteDataset(dataset_id, "test"), "ann")


@contextlib.asynccontextmanager
async def running(collector: DatasetCollector) -> AsyncIterator[DatasetCollector]:
    task = asyncio.create_task(collector.run())
    try:
        await asyncio.wait_for(collector.swept.wait(), WAIT)
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_deleted_datasets_objects_go_and_every_other_stays(
    bus: Bus, tmp_path: Path
) -> None:
    gone = await imported(bus, tmp_path, b"url\nhttp://a.example/\n", "gone")
    await imported(bus, tmp_path, b"url\nhttp://b.example/\n", "gone-v2", dataset_id=gone)
    # the same content in another dataset: stored under that dataset's own name
    kept = await imported(bus, tmp_path, b"url\nhttp://a.example/\n", "kept")
    gone_objects, kept_objects = await objects_of(bus, gone), await objects_of(bus, kept)
    assert len(gone_objects) == 2 and set(gone_objects).isdisjoint(kept_objects)

    async with running(DatasetCollector(bus)) as collector:
        assert collector.removed == []  # nothing deleted yet: the sweep removes nothing
        await delete(bus, gone)
        await asyncio.wait_for(collector.wait_collected(gone), WAIT)

    assert sorted(collector.removed) == sorted(gone_objects)
    assert await in_bucket(bus) == set(kept_objects)
    assert await messages(bus) == 2  # nothing of the removed objects stays
    rows = io.BytesIO()
    store = await bus.js.object_store(subjects.DATASETS_BUCKET)
    await store.get(kept_objects[0], writeinto=rows)  # type: ignore[arg-type]
    assert b"a.example" in rows.getvalue()


async def test_the_sweep_on_start_finishes_what_a_dead_process_left(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await bus.js.object_store(subjects.DATASETS_BUCKET)
    first = await imported(bus, tmp_path, b"url\nhttp://a.example/\n", "first")
    await imported(bus, tmp_path, b"url\nhttp://b.example/\n", "first-v2", dataset_id=first)
    second = await imported(bus, tmp_path, b"url\nhttp://c.example/\n", "second")
    live = await imported(bus, tmp_path, b"url\nhttp://d.example/\n", "live")
    # stored for the first dataset while it was being deleted: no event names it
    orphan = subjects.dataset_object_name(first, "e" * 64)
    await store.put(orphan, b"{}\n")
    # an upload of the live dataset still on its way: kept
    arriving = subjects.dataset_object_name(live, "f" * 64)
    await store.put(arriving, b"{}\n")
    # objects named by content alone, from before objects were named per dataset: one
    # named by a dataset in use too, one only by a deleted one
    shared, alone = "rows/" + "1" * 64 + ".jsonl", "rows/" + "2" * 64 + ".jsonl"
    for name in (shared, alone):
        await store.put(name, b"{}\n")
    commands = DatasetCommands(bus)
    for dataset_id, name in (("old_a", shared), ("old_b", shared), ("old_c", alone)):
        rows = StoredRows("csv", name, name[5:69], 3, 1, "0" * 64, 3)
        await commands.execute(CreateDataset(dataset_id, dataset_id, "targets", rows), "ann")
    for dataset_id in (first, second, "old_a", "old_c"):
        await delete(bus, dataset_id)  # and the engine is down: nothing collects them

    # a removal cut short: one object's meta left after its chunks, another left as the
    # client library's "deleted" marker with its chunks still stored
    first_objects = await objects_of(bus, first)
    real_purge = bus.js.purge_stream
    calls = 0

    async def dies_on_second_purge(*args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("process killed")
        return await real_purge(*args, **kwargs)

    monkeypatch.setattr(bus.js, "purge_stream", dies_on_second_purge)
    with pytest.raises(RuntimeError, match="killed"):
        await remove_object(bus, subjects.DATASETS_BUCKET, first_objects[0])
    calls = 1
    with pytest.raises(RuntimeError, match="killed"):
        await store.delete(first_objects[1])
    monkeypatch.setattr(bus.js, "purge_stream", real_purge)
    assert set(first_objects) <= await in_bucket(bus)

    async with running(DatasetCollector(bus)) as collector:
        for dataset_id in (first, second, "old_a", "old_c"):
            await asyncio.wait_for(collector.wait_collected(dataset_id), WAIT)

    remaining = {*await objects_of(bus, live), arriving, shared}
    assert await in_bucket(bus) == remaining
    assert await messages(bus) == 2 * len(remaining)
    # a second start finds nothing left to do
    async with running(DatasetCollector(bus)) as again:
        assert again.removed == []


async def test_collection_never_holds_up_the_delete_and_is_retried(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset_id = await imported(bus, tmp_path, b"url\nhttp://a.example/\n", "slow")
    [name] = await objects_of(bus, dataset_id)
    real_purge = bus.js.purge_stream
    failures = 0

    async def unavailable_twice(*args: Any, **kwargs: Any) -> bool:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise nats.errors.TimeoutError
        return await real_purge(*args, **kwargs)

    async with running(DatasetCollector(bus)) as collector:
        monkeypatch.setattr(bus.js, "purge_stream", unavailable_twice)
        await delete(bus, dataset_id)  # answered: the event is in the log
        assert name in await in_bucket(bus)
        await asyncio.wait_for(collector.wait_collected(dataset_id), WAIT)
    assert failures == 2 and await in_bucket(bus) == set()


# -- the rule, pure ----------------------------------------------------------------------

DATASETS = st.sampled_from(["d1", "d2", "d3"])
NAMES = st.sampled_from(["rows/a.jsonl", "rows/b.jsonl", "rows/d1/x.jsonl", "rows/d2/y.jsonl"])


@given(
    versions=st.lists(st.tuples(DATASETS, NAMES), max_size=8),
    deleted=st.sets(DATASETS),
)
def test_an_object_a_dataset_in_use_names_is_never_collected(
    versions: list[tuple[str, str]], deleted: set[str]
) -> None:
    objects = StoredObjects()
    for n, (dataset_id, name) in enumerate(versions):
        objects.apply(upload_event(n, dataset_id, name))
    for dataset_id in sorted(deleted):
        assert objects.apply(deleted_event(dataset_id)) == dataset_id
    in_use = {name for dataset_id, name in versions if dataset_id not in deleted}
    collectable = set(objects.collectable(["d1", "d2", "d3"]))
    assert collectable.isdisjoint(in_use)
    assert collectable == {name for _, name in versions} - in_use
    for name in ("rows/a.jsonl", "rows/d1/x.jsonl", "rows/d3/z.jsonl"):
        expected = name in collectable or (
            name not in {n for _, n in versions} and subjects.dataset_of_object(name) in deleted
        )
        assert objects.left_behind(name) == expected


def upload_event(n: int, dataset_id: str, name: str) -> DatasetVersionUploaded:
    return DatasetVersionUploaded(
        id=f"u{n}", at=AT, actor="ann", dataset_id=dataset_id, version=n + 1, format="csv",
        object_name=name, sha256="0" * 64, size_bytes=1, rows=1, source_sha256="0" * 64,
        source_size=1,
    )  # fmt: skip


def deleted_event(dataset_id: str) -> DatasetDeleted:
    return DatasetDeleted(id=f"x{dataset_id}", at=AT, actor="ann", dataset_id=dataset_id)
