"""The audit trail: every event with subject, sequence, time, actor and type, filtered,
paged by an opaque cursor, and exported as JSON lines or CSV."""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import aiosqlite
import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.params import QueryParameter
from litestar.response import Stream

from api.authz import access
from api.deps import services_from_state
from api.openapi import problems
from api.reads import MIN_SEQ_HELP
from api.reads import wait_for_seq as _wait
from api.services import Services
from engine.errors import Invalid
from engine.jobs.service import checked_job_id
from projections import audit_reads
from projections import db as read_db
from projections.audit_reads import EVENT_TYPES, AuditEntry, AuditFilter, AuditLine
from schemas.ids import ID_RULE

CURSOR_RULE = "must be a next_cursor this endpoint answered"
MAX_LIMIT = 1000
CSV_COLUMNS = ("seq", "subject", "at", "actor", "type", "job_id", "event")
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


class AuditPage(msgspec.Struct, kw_only=True):
    """``next_cursor``: pass it as ``cursor`` for the events after this page (also when
    ``has_more`` is false: it then answers events stored later)."""

    items: list[AuditEntry]
    next_cursor: str
    has_more: bool


def _time_parameter(name: str, which: str) -> Any:
    return QueryParameter(
        name=name,
        description=f"events {which} this time (ISO 8601; UTC without an offset)",
        schema_extra={"format": "date-time", "maxLength": 64},
    )


def audit_filter(
    job_id: Annotated[
        str | None,
        QueryParameter(
            description=f"only events of this job: {ID_RULE}",
            schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
        ),
    ] = None,
    actor: Annotated[
        str | None,
        QueryParameter(
            min_length=1, max_length=200, description="only events by this user, runner or system"
        ),
    ] = None,
    event_type: Annotated[
        str | None,
        QueryParameter(
            name="type",
            description="only events of this type (JobCreated, FlowDone, ...)",
            schema_extra={"enum": sorted(EVENT_TYPES)},
        ),
    ] = None,
    since: Annotated[str | None, _time_parameter("from", "at or after")] = None,
    until: Annotated[str | None, _time_parameter("to", "before")] = None,
) -> AuditFilter:
    """The filters of both endpoints; a time without an offset is taken as UTC."""
    if job_id is not None:
        checked_job_id(job_id)
    if event_type is not None and event_type not in EVENT_TYPES:
        raise Invalid("type", f"must be an event type: {', '.join(sorted(EVENT_TYPES))}")
    start, end = _instant("from", since), _instant("to", until)
    if start is not None and end is not None and end <= start:
        raise Invalid("to", "must be later than from")
    return AuditFilter(job_id=job_id, actor=actor, type=event_type, since=start, until=end)


def _instant(field: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        at = datetime.fromisoformat(raw) if len(raw) <= 64 else None
    except ValueError:
        at = None
    if at is None:
        raise Invalid(field, "must be a time in ISO 8601, e.g. 2026-01-31T23:59:00Z")
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode({"after": seq})).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        after = msgspec.json.decode(raw, type=dict[Literal["after"], int])["after"]
    except (binascii.Error, ValueError, msgspec.DecodeError, KeyError):
        raise Invalid("cursor", CURSOR_RULE) from None
    if not 0 <= after < 2**63:  # a stream sequence: what SQLite can compare with
        raise Invalid("cursor", CURSOR_RULE)
    return after


@dataclass
class _ExportOperation(Operation):
    """The export answers CSV too (``format=csv``): the document says so."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            text = Schema(type=OpenAPIType.STRING)
            ok.content["text/csv"] = OpenAPIMediaType(schema=text)


class AuditController(Controller):
    path = "/api/v1/audit"
    opt = access("admin")
    tags = ["audit"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "where": Provide(audit_filter, sync_to_thread=False),
    }

    @get(
        "/",
        summary="Every event of the log, oldest first: filter by job, actor, type and time",
        responses=problems(400, 409, 503),
    )
    async def list_audit(
        self,
        services: NamedDependency[Services],
        where: NamedDependency[AuditFilter],
        cursor: Annotated[
            str | None,
            QueryParameter(max_length=200, description="the next_cursor of the previous page"),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT)] = 100,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> AuditPage:
        after = decode_cursor(cursor) if cursor is not None else 0
        await _wait(services, min_seq)
        items, more = await audit_reads.page(services.db, where, after=after, limit=limit)
        last = items[-1].seq if items else after
        return AuditPage(items=items, next_cursor=encode_cursor(last), has_more=more)

    @get(
        "/export",
        operation_class=_ExportOperation,
        summary="The filtered trail as a download: one line per event (JSON lines or CSV)",
        responses={
            200: ResponseSpec(
                data_container=str,
                media_type=MEDIA_TYPES["jsonl"],
                generate_examples=False,
                description="one event per line with its seq, subject, at, actor, type, "
                "job_id and event (CSV: those columns, the event as JSON)",
            ),
            **problems(400, 409, 503),
        },
    )
    async def export_audit(
        self,
        services: NamedDependency[Services],
        where: NamedDependency[AuditFilter],
        format: Annotated[
            Literal["jsonl", "csv"], QueryParameter(description="jsonl (default) or csv")
        ] = "jsonl",
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Stream:
        await _wait(services, min_seq)
        # a connection of its own: the export's snapshot must not be other requests' one
        db = await read_db.connect(services.config.db_path, readonly=True)
        body = _export(db, where, _jsonl if format == "jsonl" else _csv)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Stream(
            body,
            media_type=MEDIA_TYPES[format],
            headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.{format}"'},
        )


async def _export(
    db: aiosqlite.Connection,
    where: AuditFilter,
    encode: Callable[[AsyncIterator[list[AuditLine]]], AsyncIterator[bytes]],
) -> AsyncGenerator[bytes, None]:
    """The export's body; ends the read and closes its connection however it ends (the
    client may leave halfway)."""
    lines = audit_reads.batches(db, where)
    try:
        async for chunk in encode(lines):
            yield chunk
    finally:
        await lines.aclose()
        await db.close()


async def _jsonl(batches: AsyncIterator[list[AuditLine]]) -> AsyncIterator[bytes]:
    encoder = msgspec.json.Encoder()
    async for batch in batches:
        buffer = bytearray()
        for line in batch:
            encoder.encode_into(line, buffer, len(buffer))
            buffer += b"\n"
        yield bytes(buffer)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    """A text cell a spreadsheet will not run as a formula (an actor is any text a
    publisher chose): a leading quote makes it text, as OWASP advises for CSV."""
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value


async def _csv(batches: AsyncIterator[list[AuditLine]]) -> AsyncIterator[bytes]:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    async for batch in batches:
        for line in batch:
            writer.writerow(
                (line.seq, _cell(line.subject), line.at, _cell(line.actor), _cell(line.type),
                 _cell(line.job_id or ""), bytes(line.event).decode())
            )  # fmt: skip
        yield text.getvalue().encode()
        text.seek(0)
        text.truncate()
    if text.tell():
        yield text.getvalue().encode()
