"""Reading a job's log: live as Server-Sent Events, or downloaded whole (txt, JSONL).

The stream starts at the job's first line in ``TB_LOGS`` and follows it live: each
line is ``data: <line>`` and a blank line (a line holding line breaks becomes several
``data:`` lines, which a client joins back), with a ``: keepalive`` comment whenever
nothing was sent for ``keepalive`` seconds; it ends once the job has ended and every
line is out. A download serves the saved log of an ended job (``engine.job_logs``),
saving it first if that has not happened yet; a running job's is what is there now.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO, Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import QueryParameter
from litestar.response import Stream

from api.authz import access
from api.deps import services_from_state
from api.inputs import JobIdPath, job_id_in_path
from api.live_auth import RAW_SSE_SESSION_EXPIRED, until_session_ends
from api.log_ingest import ApiKey, Said, ingest_key_guard
from api.openapi import problems
from api.services import Services
from engine.errors import NotFound
from engine.job_logs import ENDING_TYPES, last_job_event_type, read_log, save_log, saved_log
from projections import queries
from schemas.ids import is_valid_id
from schemas.logs import LogLine, decode_log_line, encode_log_line
from schemas.values import TERMINAL_JOB_STATUSES

EVENT_STREAM = "text/event-stream"
KEEPALIVE = b": keepalive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_RESPONSE = {
    200: ResponseSpec(
        data_container=str,
        media_type=EVENT_STREAM,
        description="`data: <line>` and a blank line per log line; `: keepalive` comments",
    )
}


def sse_frame(message: str) -> bytes:
    lines = message.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return ("".join(f"data: {line}\n" for line in lines) + "\n").encode()


async def job_ended(services: Services, job_id: str) -> bool | None:
    """Whether the job has ended; ``None`` when there is no such job."""
    view = await queries.get_job(services.db, job_id)
    if view is not None and view.status in TERMINAL_JOB_STATUSES:
        return True
    if not is_valid_id(job_id):
        return None
    last = await last_job_event_type(services.bus, job_id)
    return None if last is None else last in ENDING_TYPES


async def log_events(services: Services, job_id: str) -> AsyncIterator[bytes]:
    keepalive = services.config.logs.keepalive
    quiet_since = time.monotonic()
    batches = read_log(services.bus, job_id, follow=True, linger=min(1.0, keepalive))
    async with contextlib.aclosing(batches):
        async for batch in batches:
            now = time.monotonic()
            if batch:
                yield b"".join(sse_frame(stored.line.message) for stored in batch)
                quiet_since = now
            elif await job_ended(services, job_id):
                return  # caught up with an ended job: nothing more will come
            elif now - quiet_since >= keepalive:
                yield KEEPALIVE
                quiet_since = now


async def stream_of(
    services: Services, job_id: str, connection: ASGIConnection[Any, Any, Any, Any]
) -> Stream:
    if await job_ended(services, job_id) is None:
        raise Said(404, "job_id", f"Job {job_id} not found")
    events = until_session_ends(connection, log_events(services, job_id), RAW_SSE_SESSION_EXPIRED)
    return Stream(events, media_type=EVENT_STREAM, headers=SSE_HEADERS)


# -- download ---------------------------------------------------------------------------

LogFormat = Literal["txt", "jsonl"]
MEDIA: dict[str, str] = {"txt": "text/plain; charset=utf-8", "jsonl": "application/x-ndjson"}


def as_text(line: LogLine) -> bytes:
    return f"{line.at.isoformat()} {line.source} {line.message}\n".encode()


def as_json_line(line: LogLine) -> bytes:
    return encode_log_line(line) + b"\n"


def _saved_lines(saved: IO[bytes]) -> Iterator[LogLine]:
    """One line at a time: a big log is streamed from its spool file, never held whole."""
    for raw in saved:
        try:
            yield decode_log_line(raw)
        except msgspec.DecodeError:
            continue  # not a log line: the rest still reads


async def log_lines(services: Services, job_id: str, ended: bool) -> AsyncIterator[LogLine]:
    """The saved log; an ended job's is saved now if it was not yet; a running job's is
    what ``TB_LOGS`` holds now."""
    bus = services.bus
    for attempt in range(2):
        async with saved_log(bus, job_id) as saved:
            if saved is not None:
                for line in _saved_lines(saved):
                    yield line
                return
        if not ended or attempt:
            break
        await save_log(bus, job_id)
    batches = read_log(bus, job_id, follow=False)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for stored in batch:
                yield stored.line


async def download(services: Services, job_id: str, fmt: LogFormat) -> AsyncIterator[bytes]:
    encode = as_text if fmt == "txt" else as_json_line
    ended = bool(await job_ended(services, job_id))
    async for line in log_lines(services, job_id, ended):
        yield encode(line)


class JobLogReads(Controller):
    opt = access("viewer")
    path = "/api/v1/jobs"
    tags = ["logs"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/{job_id:str}/logs/stream",
        summary="The job's log live (Server-Sent Events), from its first line",
        media_type=EVENT_STREAM,
        responses={**SSE_RESPONSE, **problems(400, 404)},
    )
    async def stream(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
    ) -> Stream:
        return await stream_of(services, job_id_in_path(job_id), request)

    @get(
        "/{job_id:str}/logs",
        summary="The job's log as a file (saved when the job ended)",
        media_type="text/plain",
        responses={
            200: ResponseSpec(data_container=str, media_type="text/plain", description="the log"),
            **problems(400, 404),
        },
    )
    async def download(
        self,
        job_id: JobIdPath,
        services: NamedDependency[Services],
        format: Annotated[
            LogFormat,
            QueryParameter(description="txt: `<time> <source> <line>`; jsonl: one JSON object"),
        ] = "txt",
    ) -> Stream:
        job_id = job_id_in_path(job_id)
        if await job_ended(services, job_id) is None:
            raise NotFound("job_id", f"no job {job_id}")
        suffix = "log" if format == "txt" else "jsonl"
        return Stream(
            download(services, job_id, format),
            media_type=MEDIA[format],
            headers={"Content-Disposition": f'attachment; filename="{job_id}.{suffix}"'},
        )


class LegacyLogStream(Controller):
    opt = access("ingest")
    path = "/api/crawler"
    tags = ["logs (crawler-compatible)"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}
    guards = [ingest_key_guard]

    @get(
        "/logs/{job_id:str}",
        summary="The job's log live (Server-Sent Events), crawler-compatible",
        media_type=EVENT_STREAM,
        responses={**SSE_RESPONSE, **problems(404)},
    )
    async def stream(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        x_api_key: ApiKey = None,
    ) -> Stream:
        return await stream_of(services, job_id, request)
