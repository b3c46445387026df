"""Getting files in: chunked, resumable uploads and a single-request import.

POST /api/v1/datasets/uploads starts one (name, kind, format, size, sha256) and answers
its id and chunk size; PUT .../chunks/{index} sends chunk ``index`` (raw bytes, every
chunk but the last exactly ``chunk_size`` long; sending one again is harmless); GET the
upload says which chunks it has; POST .../finish checks size and sha256, parses and
validates every row and stores the version (201), or answers 422 with up to 50
problems, each naming the row, the field and the rule, storing nothing. Uploads live in
NATS (``engine.datasets.uploads``), so any API replica serves any chunk.

The app's JSON body limit does not apply to chunks: their route takes one chunk, and the
import route one small file (``UploadsConfig``).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Controller, Litestar, Request, Response, Router, get, post, put
from litestar.datastructures import State, UploadFile
from litestar.di import NamedDependency, Provide
from litestar.enums import RequestEncodingType
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, JSONBody, PathParameter

from api.authz import access
from api.dataset_access import check_changeable, check_import, reader_of
from api.deps import services_from_state
from api.inputs import command_id
from api.openapi import problems
from api.services import Services
from engine.cancellation import stop_task
from engine.datasets.imports import RowsRefused, Source, import_file
from engine.datasets.service import DatasetCommands, checked_dataset_id
from engine.datasets.tables import Problem
from engine.datasets.uploads import Finished, Upload, Uploads, UploadsConfig
from engine.errors import Conflict, Invalid, NotFound
from schemas.events import DatasetFormat, DatasetKind
from schemas.ids import is_valid_id

DatasetName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
UploadIdPath = Annotated[
    str,
    PathParameter(
        description="an upload id, as starting the upload answered it",
        schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
    ),
]
ChunkIndex = Annotated[
    int, PathParameter(ge=0, le=1_000_000, description="the chunk's index, from 0")
]
EXTENSIONS: dict[str, DatasetFormat] = {
    ".csv": "csv",
    ".txt": "txt",
    ".xlsx": "xlsx",
    ".docx": "docx",
    ".json": "json",
}


class StartUploadIn(msgspec.Struct, forbid_unknown_fields=True):
    name: DatasetName
    kind: DatasetKind
    format: DatasetFormat
    size: Annotated[int, msgspec.Meta(ge=1, le=1 << 50)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
    dataset_id: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")] | None = (
        None  # a new version of this dataset; none: a new dataset
    )


class UploadStarted(msgspec.Struct):
    upload_id: str
    chunk_size: int
    chunks: int


class ChunkStored(msgspec.Struct):
    upload_id: str
    index: int
    size: int


class UploadView(msgspec.Struct, kw_only=True, omit_defaults=True):
    upload_id: str
    name: str
    kind: str
    format: str
    size: int
    sha256: str
    chunk_size: int
    chunks: int
    received: list[int]
    missing: list[int]
    expires_at: str
    dataset_id: str | None = None
    finished: Finished | None = None


class FinishedOut(msgspec.Struct):
    """``warnings``: duplicate rows (kept once) by row; ``seq``: reads can wait for it."""

    dataset_id: str
    version: int
    rows: int
    warnings: list[Problem]
    seq: int


class RowsRefusedOut(msgspec.Struct):
    """422: the file was refused whole; ``errors`` names up to 50 rows, fields and rules."""

    status_code: int
    detail: str
    field: str
    rule: str
    errors: list[Problem]


@dataclass
class ImportForm:
    file: UploadFile
    kind: DatasetKind
    name: str = ""
    format: str = ""  # from the file's extension when not given
    dataset_id: str | None = None


UPLOAD_REFUSED = {
    422: ResponseSpec(
        data_container=RowsRefusedOut,
        description="the file was refused whole (bad rows, or a file that is not what it"
        " says): `errors` names up to 50 rows, fields and rules; nothing was stored",
    )
}


def uploads_from_state(state: State) -> Uploads:
    uploads: Uploads = state.uploads
    return uploads


def _refused(errors: list[Problem]) -> Response[RowsRefusedOut]:
    first = errors[0]
    where = first.place or f"row {first.row}"
    body = RowsRefusedOut(
        status_code=422,
        detail=f"{len(errors)} problem(s); first: {where}: {first.field}: {first.rule}",
        field=first.field,
        rule=first.rule,
        errors=errors,
    )
    return Response(body, status_code=422)


def _finished(finished: Finished) -> Response[FinishedOut]:
    body = FinishedOut(
        finished.dataset_id, finished.version, finished.rows, finished.warnings, finished.seq
    )
    return Response(body, status_code=201)


async def _owned(uploads: Uploads, request: Request[Any, Any, Any], upload_id: str) -> Upload:
    if not is_valid_id(upload_id):
        raise Invalid("upload_id", "is not an upload id")
    upload = await uploads.get(upload_id)
    reader = reader_of(request)
    if not (reader.admin or reader.user_id == upload.owner):
        raise NotFound("upload_id", f"no upload {upload_id}")
    return upload


async def _may_add_version(
    services: Services, request: Request[Any, Any, Any], dataset_id: str, kind: DatasetKind
) -> None:
    dataset = await DatasetCommands(services.bus).load(checked_dataset_id(dataset_id))
    check_changeable(dataset, reader_of(request), dataset_id, "add a version")
    if dataset.kind != kind:
        raise Conflict("kind", f"dataset {dataset_id} holds {dataset.kind}, not {kind}")


class UploadController(Controller):
    path = "/api/v1/datasets"
    tags = ["datasets"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "uploads": Provide(uploads_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/uploads",
        status_code=201,
        summary="Start a chunked upload: what is coming, its size and sha256",
        responses=problems(400, 403, 404, 409, 422, 503),
        opt=access("operator"),
    )
    async def start(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[StartUploadIn],
        services: NamedDependency[Services],
        uploads: NamedDependency[Uploads],
        command_id: NamedDependency[str],
    ) -> UploadStarted:
        await check_import(services, request, data.kind)
        if data.dataset_id is not None:
            await _may_add_version(services, request, data.dataset_id, data.kind)
        upload = await uploads.start(
            owner=reader_of(request).user_id,
            name=data.name,
            kind=data.kind,
            fmt=data.format,
            size=data.size,
            sha256=data.sha256,
            dataset_id=data.dataset_id,
            command_id=command_id,
        )
        return UploadStarted(upload.upload_id, upload.chunk_size, upload.chunks)

    @get(
        "/uploads/{upload_id:str}",
        summary="An upload: the chunks it has and those it still needs",
        responses=problems(400, 404, 503),
        opt=access("operator"),
    )
    async def get_upload(
        self,
        request: Request[Any, Any, Any],
        upload_id: UploadIdPath,
        uploads: NamedDependency[Uploads],
    ) -> UploadView:
        upload = await _owned(uploads, request, upload_id)
        received = [] if upload.finished else await uploads.received(upload)
        have = set(received)
        return UploadView(
            upload_id=upload.upload_id,
            name=upload.name,
            kind=upload.kind,
            format=upload.format,
            size=upload.size,
            sha256=upload.sha256,
            chunk_size=upload.chunk_size,
            chunks=upload.chunks,
            received=received,
            missing=[] if upload.finished else [i for i in range(upload.chunks) if i not in have],
            expires_at=upload.expires_at(uploads.config.lifetime).isoformat(),
            dataset_id=upload.dataset_id,
            finished=upload.finished,
        )

    @post(
        "/uploads/{upload_id:str}/finish",
        status_code=201,
        summary="Check size and sha256, parse and validate every row, store the version",
        description="201 with the dataset, its new version, the rows stored and warnings"
        " (duplicate rows, kept once). 422 with up to 50 `errors` (row, field, rule) when"
        " any row is bad: nothing is stored. Finishing again answers the same.",
        responses={
            **problems(400, 403, 404, 409, 503),
            **UPLOAD_REFUSED,
        },
        opt=access("operator"),
    )
    async def finish(
        self,
        request: Request[Any, Any, Any],
        upload_id: UploadIdPath,
        services: NamedDependency[Services],
        uploads: NamedDependency[Uploads],
    ) -> Response[FinishedOut | RowsRefusedOut]:
        upload = await _owned(uploads, request, upload_id)
        if upload.finished is not None:
            return _finished(upload.finished)  # type: ignore[return-value]
        await check_import(services, request, upload.kind)
        if upload.dataset_id is not None:
            await _may_add_version(services, request, upload.dataset_id, upload.kind)
        # one request parses at a time; another finishing it meanwhile waits for its answer
        upload = await uploads.claim_finish(upload_id)
        if upload.finished is not None:
            return _finished(upload.finished)  # type: ignore[return-value]
        try:
            finished = await _stored(services, uploads, upload)
        except RowsRefused as refused:
            await uploads.release_finish(upload_id)
            return _refused(refused.errors)  # type: ignore[return-value]
        except BaseException:
            await asyncio.shield(uploads.release_finish(upload_id))
            raise
        await uploads.finish(upload, finished)
        return _finished(finished)  # type: ignore[return-value]


async def _stored(services: Services, uploads: Uploads, upload: Upload) -> Finished:
    with tempfile.TemporaryDirectory(prefix="tb-upload-") as tmp:
        path = Path(tmp) / f"source.{upload.format}"
        with path.open("wb") as out:
            await uploads.assemble(upload, out)
        source = Source(path, upload.kind, upload.format, upload.sha256, upload.size)
        return await import_file(
            services.bus,
            source,
            name=upload.name,
            actor=upload.owner,
            command_id=f"upload:{upload.upload_id}",
            dataset_id=upload.dataset_id,
            shipped=services.config.device_catalogues,
        )


class ImportController(Controller):
    path = "/api/v1/datasets"
    tags = ["datasets"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/import",
        status_code=201,
        summary="Import a small file in one request (multipart: file, kind, name, format)",
        description="The same parser and answers as a chunked upload's finish.",
        responses={**problems(400, 403, 404, 409, 503), **UPLOAD_REFUSED},
        opt=access("operator"),
    )
    async def import_small(
        self,
        request: Request[Any, Any, Any],
        data: Annotated[ImportForm, Body(media_type=RequestEncodingType.MULTI_PART)],
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> Response[FinishedOut | RowsRefusedOut]:
        fmt = _format_of(data)
        await check_import(services, request, data.kind)
        if data.dataset_id is not None:
            await _may_add_version(services, request, data.dataset_id, data.kind)
        name = data.name or Path(data.file.filename or "").stem or "import"
        if len(name) > 200:
            raise Invalid("name", "must be at most 200 characters")
        with tempfile.TemporaryDirectory(prefix="tb-import-") as tmp:
            path = Path(tmp) / f"source.{fmt}"
            digest, size = hashlib.sha256(), 0
            with path.open("wb") as out:
                while chunk := await data.file.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size == 0:
                raise Invalid("file", "must not be empty")
            source = Source(path, data.kind, fmt, digest.hexdigest(), size)
            try:
                finished = await import_file(
                    services.bus,
                    source,
                    name=name,
                    actor=reader_of(request).user_id,
                    command_id=f"import:{command_id}",
                    dataset_id=data.dataset_id,
                    shipped=services.config.device_catalogues,
                )
            except RowsRefused as refused:
                return _refused(refused.errors)  # type: ignore[return-value]
        return _finished(finished)  # type: ignore[return-value]


def _format_of(form: ImportForm) -> DatasetFormat:
    if form.format:
        if form.format not in EXTENSIONS.values():
            raise Invalid("format", f"must be one of {', '.join(EXTENSIONS.values())}")
        return form.format  # type: ignore[return-value]
    suffix = Path(form.file.filename or "").suffix.lower()
    if suffix not in EXTENSIONS:
        names = ", ".join(EXTENSIONS)
        raise Invalid("format", f"must be given, or the file named {names}")
    return EXTENSIONS[suffix]


class ChunkController(Controller):
    path = "/api/v1/datasets/uploads"
    tags = ["datasets"]
    dependencies = {"uploads": Provide(uploads_from_state, sync_to_thread=False)}

    @put(
        "/{upload_id:str}/chunks/{index:int}",
        summary="Send one chunk (raw bytes); sending it again is harmless",
        responses=problems(400, 404, 409, 413, 503),
        opt=access("operator"),
    )
    async def put_chunk(
        self,
        request: Request[Any, Any, Any],
        upload_id: UploadIdPath,
        index: ChunkIndex,
        uploads: NamedDependency[Uploads],
    ) -> ChunkStored:
        # the body is read raw, whatever its content type says: it is a slice of a file
        upload = await _owned(uploads, request, upload_id)
        body = await request.body()
        await uploads.put_chunk(upload, index, body)
        return ChunkStored(upload_id=upload_id, index=index, size=len(body))


async def raw_body(_: Request[Any, Any, Any]) -> None:
    """Chunks and files are not JSON: the app's JSON depth check does not apply."""


def dataset_routes(config: UploadsConfig) -> list[Any]:
    """The dataset routes; chunks and imports have their own body limits."""
    from api.datasets import DatasetController

    return [
        DatasetController,
        UploadController,
        Router(
            path="/",
            route_handlers=[ImportController],
            before_request=raw_body,
            request_max_body_size=config.import_max_size,
        ),
        Router(
            path="/",
            route_handlers=[ChunkController],
            before_request=raw_body,
            request_max_body_size=config.chunk_size,
        ),
    ]


@asynccontextmanager
async def uploads_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Uploads on ``app.state``, and the sweeper that removes idle ones with their chunks."""
    services: Services = app.state.services
    uploads = Uploads(services.bus, services.config.uploads)
    app.state.uploads = uploads
    sweeper = asyncio.create_task(uploads.sweep_forever(), name="upload-sweeper")
    try:
        yield
    finally:
        await stop_task(sweeper)
