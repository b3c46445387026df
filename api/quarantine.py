"""Quarantined messages: what no reader could take as an event, and why."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from api.authz import access
from api.deps import services_from_state
from api.openapi import problems
from api.services import Services
from engine.quarantine import list_quarantined
from schemas.quarantine import QuarantinedMessage

PREVIEW_CHARS = 200


class QuarantinedView(msgspec.Struct, kw_only=True):
    stream: str
    seq: int  # where the original still is
    subject: str
    reason: str
    detected_by: str
    at: datetime
    size: int
    raw_base64: str
    preview: str  # the first characters, with bytes that are not text shown as escapes


class QuarantinePage(msgspec.Struct, kw_only=True):
    items: list[QuarantinedView]
    next_after: int  # pass as ``after`` for the next page; unchanged when there is none


class QuarantineController(Controller):
    path = "/api/v1/quarantine"
    opt = access("viewer")
    tags = ["quarantine"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/",
        summary="Messages no reader could take as events (each listed once), oldest first",
        responses=problems(400, 503),
    )
    async def list_quarantine(
        self,
        services: NamedDependency[Services],
        after: Annotated[
            int, QueryParameter(ge=0, description="the next_after of the previous page")
        ] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
    ) -> QuarantinePage:
        records, cursor = await list_quarantined(services.bus.js, after=after, limit=limit)
        seen: set[tuple[str, int]] = set()
        items = []
        for record in records:
            if (record.stream, record.seq) in seen:
                continue  # recorded twice (after the dedupe window): one message
            seen.add((record.stream, record.seq))
            items.append(view(record))
        return QuarantinePage(items=items, next_after=cursor)


def view(record: QuarantinedMessage) -> QuarantinedView:
    return QuarantinedView(
        stream=record.stream,
        seq=record.seq,
        subject=record.subject,
        reason=record.reason,
        detected_by=record.detected_by,
        at=record.at,
        size=len(record.raw),
        raw_base64=base64.b64encode(record.raw).decode("ascii"),
        preview=preview(record.raw),
    )


def preview(raw: bytes) -> str:
    text = raw[: PREVIEW_CHARS * 4].decode("utf-8", "backslashreplace")[:PREVIEW_CHARS]
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
