"""The dataset aggregate without the API: decisions, who sees what, events on their
subjects, idle uploads swept away with their chunks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from api.authz import Principal
from api.dataset_access import reader_of
from engine.bus import Bus
from engine.datasets.access import Reader, may_change, may_see
from engine.datasets.decider import (
    CreateDataset,
    Dataset,
    DeleteDataset,
    Meta,
    RenameDataset,
    ShareDataset,
    StoredRows,
    UnshareDataset,
    UploadVersion,
    decide,
    evolve,
)
from engine.datasets.service import DatasetCommands
from engine.datasets.uploads import Finished, Upload, Uploads, UploadsConfig
from engine.errors import Conflict, NotFound
from schemas import subjects
from schemas.events import (
    DatasetCreated,
    DatasetShared,
    DatasetVersionUploaded,
    Role,
    decode_event,
    encode_event,
)
from schemas.stored import decode_stored

AT = datetime(2026, 1, 1, tzinfo=UTC)
META = Meta(ids=("e1", "e2"), at=AT, actor="ann")
ROWS = StoredRows("csv", "rows/" + "a" * 64 + ".jsonl", "a" * 64, 10, 2, "b" * 64, 12)


def caller(user_id: str, role: Role) -> Principal:
    return Principal(user_id=user_id, username=user_id, role=role, plan="trial", via="session")


def run(dataset: Dataset, *cmds: object) -> Dataset:
    for seq, cmd in enumerate(cmds, start=dataset.version + 1):
        for event in decide(dataset, cmd, META):  # type: ignore[arg-type]
            dataset = evolve(dataset, event, seq)
    return dataset


def test_create_stores_the_dataset_and_its_first_version_owned_by_the_creator() -> None:
    events = decide(Dataset(), CreateDataset("ds_1", "shop", "targets", ROWS), META)
    assert [type(e) for e in events] == [DatasetCreated, DatasetVersionUploaded]
    assert [e.id for e in events] == ["e1", "e2"]
    dataset = run(Dataset(), CreateDataset("ds_1", "shop", "targets", ROWS))
    assert (dataset.owner, dataset.versions, dataset.kind) == ("ann", 1, "targets")
    with pytest.raises(Conflict):
        decide(dataset, CreateDataset("ds_1", "again", "targets", ROWS), META)


def test_versions_follow_each_other_and_the_kind_never_changes() -> None:
    dataset = run(
        Dataset(),
        CreateDataset("ds_1", "shop", "targets", ROWS),
        UploadVersion("ds_1", "targets", ROWS),
        UploadVersion("ds_1", "targets", ROWS),
    )
    assert dataset.versions == 3
    with pytest.raises(Conflict):
        decide(dataset, UploadVersion("ds_1", "proxies", ROWS), META)


def test_sharing_renaming_and_deleting() -> None:
    dataset = run(
        Dataset(),
        CreateDataset("ds_1", "shop", "targets", ROWS),
        ShareDataset("ds_1", "bob"),
        ShareDataset("ds_1", "bob"),  # nothing new
        ShareDataset("ds_1", "cy"),
        UnshareDataset("ds_1", "cy"),
        RenameDataset("ds_1", "store"),
    )
    assert dataset.shared_with == {"bob"} and dataset.name == "store"
    assert decide(dataset, ShareDataset("ds_1", "bob"), META) == []
    assert decide(dataset, RenameDataset("ds_1", "store"), META) == []
    gone = run(dataset, DeleteDataset("ds_1"))
    with pytest.raises(NotFound):
        decide(gone, RenameDataset("ds_1", "x"), META)


@pytest.mark.parametrize(
    ("principal", "sees", "changes"),
    [
        (caller("ann", "operator"), True, True),  # the owner
        (caller("bob", "viewer"), True, False),  # shared with
        (caller("cy", "operator"), False, False),  # anyone else
        (caller("root", "admin"), True, True),
    ],
)
def test_owner_and_shared_users_see_a_dataset_admins_all_others_nothing(
    principal: Principal, sees: bool, changes: bool
) -> None:
    class Connection:
        scope = {"user": principal}

    reader = reader_of(Connection())
    assert may_see(reader, "ann", {"bob"}) is sees
    assert may_change(reader, "ann") is changes


def test_no_identity_on_the_request_is_the_api_user_and_no_admin() -> None:
    class Connection:
        scope: dict[str, object] = {}

    assert reader_of(Connection()) == Reader("api", admin=False)


def test_dataset_events_decode_on_their_subjects_only() -> None:
    event = DatasetShared(id="e", at=AT, actor="ann", dataset_id="ds_1", user_id="bob")
    data = encode_event(event)
    assert decode_event(data) == event
    subject = subjects.subject_for(event)
    assert subject == "tb.dataset.ds_1.DatasetShared"
    assert decode_stored(subject, data, None) == event
    with pytest.raises(Exception, match="belongs on"):
        decode_stored("tb.dataset.ds_2.DatasetShared", data, None)


async def test_an_idle_upload_is_swept_with_its_chunks(bus: Bus) -> None:
    now = [AT]
    uploads = Uploads(bus, UploadsConfig(chunk_size=4, lifetime=60), clock=lambda: now[0])

    async def begin() -> Upload:
        return await uploads.start(
            owner="ann", name="x", kind="targets", fmt="txt", size=6, sha256="0" * 64
        )

    async def messages() -> int:
        info = await bus.js.stream_info(f"OBJ_{subjects.UPLOADS_BUCKET}")
        return int(info.state.messages)

    idle = await begin()
    await uploads.put_chunk(idle, 0, b"abcd")
    now[0] = AT + timedelta(seconds=30)
    busy = await begin()
    now[0] = AT + timedelta(seconds=50)
    await uploads.put_chunk(busy, 1, b"ef")  # a chunk touches its upload
    now[0] = AT + timedelta(seconds=59)
    assert await uploads.sweep() == []
    now[0] = AT + timedelta(seconds=61)
    assert await uploads.sweep() == [idle.upload_id]
    with pytest.raises(NotFound):
        await uploads.get(idle.upload_id)
    assert await uploads.received(busy) == [1]
    assert await messages() == 2  # the busy upload's chunk and its metadata
    now[0] = AT + timedelta(seconds=111)
    assert await uploads.sweep() == [busy.upload_id]
    assert await messages() == 0  # chunks and their deletion markers, all gone


async def test_concurrent_versions_each_get_their_own_number(bus: Bus) -> None:
    commands = DatasetCommands(bus)
    await commands.execute(CreateDataset("ds_c", "c", "targets", ROWS), "ann", "create")
    results = await asyncio.gather(
        *(
            commands.execute(UploadVersion("ds_c", "targets", ROWS), "ann", f"v{n}")
            for n in range(8)
        )
    )
    assert len({appended.seq for _, appended in results}) == 8
    versions = [
        env.event.version
        for env in await commands.history("ds_c")
        if isinstance(env.event, DatasetVersionUploaded)
    ]
    assert versions == list(range(1, 10))
    again = await commands.execute(UploadVersion("ds_c", "targets", ROWS), "ann", "v3")
    assert again[1].seq == results[3][1].seq and again[1].duplicate  # stored nothing new
    assert (await commands.load("ds_c")).versions == 9


async def test_a_second_finish_waits_for_the_first_or_for_its_claim_to_lapse(bus: Bus) -> None:
    uploads = Uploads(bus, UploadsConfig(chunk_size=4, finish_claim=0.5))

    async def begin() -> Upload:
        return await uploads.start(
            owner="ann", name="x", kind="targets", fmt="txt", size=3, sha256="0" * 64
        )

    first = await begin()
    claimed = await uploads.claim_finish(first.upload_id)
    assert claimed.finishing_until is not None
    waiting = asyncio.create_task(uploads.claim_finish(first.upload_id))
    done = Finished("ds_x", 1, 3)
    await uploads.finish(claimed, done)
    assert (await asyncio.wait_for(waiting, 5)).finished == done

    second = await begin()
    await uploads.claim_finish(second.upload_id)  # and its holder is gone
    taken_over = await asyncio.wait_for(uploads.claim_finish(second.upload_id), 5)
    assert taken_over.finished is None and taken_over.finishing_until is not None


async def test_a_chunk_stored_as_its_upload_goes_does_not_stay(bus: Bus) -> None:
    uploads = Uploads(bus, UploadsConfig(chunk_size=4))
    upload = await uploads.start(
        owner="ann", name="x", kind="targets", fmt="txt", size=8, sha256="0" * 64
    )
    await uploads.remove(upload)  # swept while the chunk was on its way
    with pytest.raises(NotFound):
        await uploads.put_chunk(upload, 0, b"abcd")
    info = await bus.js.stream_info(f"OBJ_{subjects.UPLOADS_BUCKET}")
    assert info.state.messages == 0
