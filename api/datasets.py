"""Datasets: list what the caller may see, one dataset, its versions, a version's rows;
rename, delete, share with and unshare from named users.

Visibility: the owner, the users a dataset is shared with, and admins see it; anyone
else gets 404 (a dataset they cannot see does not exist for them). Changes are the
owner's and admins' (403 for a user it is only shared with). A version's download is
JSON lines, one row each; proxy passwords are masked unless the owner asks for them
(``?passwords=show``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, PathParameter, QueryParameter
from litestar.response import Stream

from api.authz import access, actor_of
from api.dataset_access import Forbidden, check_changeable, reader_of
from api.deps import services_from_state
from api.identity import identity_of
from api.inputs import command_id
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.reads import MIN_SEQ_HELP, wait_for_seq
from api.services import Services
from engine.datasets.access import Reader, may_see
from engine.datasets.decider import (
    DatasetCommand,
    DeleteDataset,
    RenameDataset,
    ShareDataset,
    UnshareDataset,
)
from engine.datasets.service import DatasetCommands, checked_dataset_id
from engine.datasets.versions import fetch_rows
from engine.errors import NotFound
from engine.licences import checked_user_id
from projections import datasets as views
from projections.datasets import DatasetView, VersionView
from schemas.datasets import ROW_TYPES, masked
from schemas.events import DatasetKind
from schemas.ids import ID_RULE

_ID_SCHEMA = {"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128}
DatasetIdPath = Annotated[
    str, PathParameter(description=f"a dataset id: {ID_RULE}", schema_extra=_ID_SCHEMA)
]
UserIdPath = Annotated[
    str, PathParameter(description=f"a user id: {ID_RULE}", schema_extra=_ID_SCHEMA)
]
VersionPath = Annotated[int, PathParameter(ge=1, le=1_000_000, description="a version number")]
DatasetName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class RenameIn(msgspec.Struct, forbid_unknown_fields=True):
    name: DatasetName


class Changed(msgspec.Struct):
    dataset_id: str
    seq: int  # reads can wait for it (``?min_seq=``)


def commands_from_state(state: State) -> DatasetCommands:
    services: Services = state.services
    return DatasetCommands(services.bus)


async def visible(services: Services, reader: Reader, dataset_id: str) -> DatasetView:
    """The dataset, if the caller may see it; else 404, as if there were none."""
    found = await views.get_dataset(services.db, checked_dataset_id(dataset_id))
    if found is None or found.status == "deleted":
        raise NotFound("dataset_id", f"no dataset {dataset_id}")
    if not may_see(reader, found.owner, found.shared_with):
        raise NotFound("dataset_id", f"no dataset {dataset_id}")
    return found


async def change(
    commands: DatasetCommands,
    reader: Reader,
    cmd: DatasetCommand,
    command: str,
    check: Callable[[], Awaitable[None]] | None = None,
) -> Changed:
    """Run a command on a dataset the caller may change (checked against the log), once
    ``check`` (of the command's own arguments) has passed."""
    dataset = await commands.load(cmd.dataset_id)
    check_changeable(dataset, reader, cmd.dataset_id, "change a dataset")
    if check is not None:
        await check()
    _, appended = await commands.execute(cmd, reader.user_id, command)
    return Changed(dataset_id=cmd.dataset_id, seq=appended.seq)


class DatasetController(Controller):
    path = "/api/v1/datasets"
    tags = ["datasets"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "commands": Provide(commands_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @get(
        "/",
        summary="The datasets the caller may see (own, shared with them; admins: all)",
        responses=problems(400, 409),
        response_headers=PAGE_HEADERS,
        opt=access("viewer"),
    )
    async def list_datasets(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
        kind: Annotated[
            DatasetKind | None, QueryParameter(description="only datasets of this kind")
        ] = None,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Response[list[DatasetView]]:
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        await wait_for_seq(services, min_seq)
        reader = reader_of(request)
        found = await views.list_datasets(
            services.db, reader.user_id, admin=reader.admin, kind=kind, limit=limit + 1, after=after
        )
        return page(request, found, limit, lambda dataset: (dataset.dataset_id,))

    @get(
        "/{dataset_id:str}",
        summary="One dataset, with who it is shared with",
        responses=problems(400, 404, 409),
        opt=access("viewer"),
    )
    async def get_dataset(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        services: NamedDependency[Services],
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> DatasetView:
        await wait_for_seq(services, min_seq)
        return await visible(services, reader_of(request), dataset_id)

    @get(
        "/{dataset_id:str}/versions",
        summary="A dataset's versions, oldest first (each immutable, with its sha256)",
        responses=problems(400, 404, 409),
        opt=access("viewer"),
    )
    async def list_versions(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        services: NamedDependency[Services],
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> list[VersionView]:
        await wait_for_seq(services, min_seq)
        await visible(services, reader_of(request), dataset_id)
        return await views.list_versions(services.db, dataset_id)

    @get(
        "/{dataset_id:str}/versions/{version:int}",
        summary="Download a version's rows as JSON lines",
        description="Proxy passwords are masked (`********`) unless the dataset's owner"
        " asks for them with `passwords=show`; anyone else asking gets 403.",
        responses=problems(400, 403, 404, 409),
        media_type="application/x-ndjson",
        opt=access("viewer"),
    )
    async def download(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        version: VersionPath,
        services: NamedDependency[Services],
        passwords: Annotated[
            Literal["mask", "show"],
            QueryParameter(description="`show`: the owner gets proxy passwords in clear"),
        ] = "mask",
    ) -> Stream:
        reader = reader_of(request)
        dataset = await visible(services, reader, dataset_id)
        if passwords == "show" and reader.user_id != dataset.owner:
            raise Forbidden("passwords", "only the dataset's owner may see proxy passwords")
        stored = await DatasetCommands(services.bus).version(dataset_id, version)
        tmp = tempfile.TemporaryDirectory(prefix="tb-download-")
        path = Path(tmp.name) / "rows.jsonl"
        try:
            with path.open("wb") as out:
                await fetch_rows(services.bus, stored.object_name, stored.sha256, out)
        except BaseException:
            tmp.cleanup()
            raise
        kind: DatasetKind = dataset.kind  # type: ignore[assignment]
        filename = f"{dataset_id}-v{version}.jsonl"
        return Stream(
            _lines(path, kind, passwords == "show", tmp),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @patch(
        "/{dataset_id:str}",
        summary="Rename a dataset (owner or admin)",
        responses=problems(400, 403, 404, 409, 503),
        opt=access("operator"),
    )
    async def rename(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        data: JSONBody[RenameIn],
        commands: NamedDependency[DatasetCommands],
        command_id: NamedDependency[str],
    ) -> Changed:
        cmd = RenameDataset(checked_dataset_id(dataset_id), data.name)
        return await change(commands, reader_of(request), cmd, command_id)

    @delete(
        "/{dataset_id:str}",
        status_code=200,
        summary="Delete a dataset (owner or admin); jobs that used its versions keep them",
        responses=problems(400, 403, 404, 409, 503),
        opt=access("operator"),
    )
    async def delete_dataset(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        commands: NamedDependency[DatasetCommands],
        command_id: NamedDependency[str],
    ) -> Changed:
        cmd = DeleteDataset(checked_dataset_id(dataset_id), f"deleted by {actor_of(request)}")
        return await change(commands, reader_of(request), cmd, command_id)

    @put(
        "/{dataset_id:str}/shares/{user_id:str}",
        summary="Let a user see and use the dataset (owner or admin)",
        description="The user must exist: sharing with a user id no user has is a 404"
        " naming `user_id`, and nothing is recorded.",
        responses=problems(400, 403, 404, 409, 503),
        opt=access("operator"),
    )
    async def share(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        user_id: UserIdPath,
        commands: NamedDependency[DatasetCommands],
        command_id: NamedDependency[str],
    ) -> Changed:
        cmd = ShareDataset(checked_dataset_id(dataset_id), checked_user_id(user_id))

        async def user_exists() -> None:
            # the log, not a replica's read model: a user made a moment ago is there
            if not (await identity_of(request).users.load(cmd.user_id)).exists:
                raise NotFound("user_id", f"no user {cmd.user_id}")

        return await change(commands, reader_of(request), cmd, command_id, user_exists)

    @delete(
        "/{dataset_id:str}/shares/{user_id:str}",
        status_code=200,
        summary="Stop sharing the dataset with a user (owner or admin)",
        responses=problems(400, 403, 404, 409, 503),
        opt=access("operator"),
    )
    async def unshare(
        self,
        request: Request[Any, Any, Any],
        dataset_id: DatasetIdPath,
        user_id: UserIdPath,
        commands: NamedDependency[DatasetCommands],
        command_id: NamedDependency[str],
    ) -> Changed:
        cmd = UnshareDataset(checked_dataset_id(dataset_id), checked_user_id(user_id))
        return await change(commands, reader_of(request), cmd, command_id)


async def _lines(
    path: Path, kind: DatasetKind, show: bool, tmp: tempfile.TemporaryDirectory[str]
) -> AsyncIterator[bytes]:
    decoder = msgspec.json.Decoder(ROW_TYPES[kind])
    encoder = msgspec.json.Encoder()
    try:
        with path.open("rb") as f:
            batch = bytearray()
            for line in f:
                batch += line if show else encoder.encode(masked(decoder.decode(line))) + b"\n"
                if len(batch) >= 64 * 1024:
                    yield bytes(batch)
                    batch.clear()
            if batch:
                yield bytes(batch)
    finally:
        with contextlib.suppress(OSError):
            tmp.cleanup()
