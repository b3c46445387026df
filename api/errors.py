"""Map domain errors to 4xx bodies that name the field and the rule; never a bare 500."""

from __future__ import annotations

from typing import Any

import nats.errors
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_503_SERVICE_UNAVAILABLE

from api.dto import Problem
from engine.bus import ConcurrencyConflict
from engine.errors import Rejected

log = structlog.get_logger("tb.api")


def rejected(_: Request[Any, Any, Any], exc: Rejected) -> Response[Problem]:
    body = Problem(status_code=exc.status_code, detail=str(exc), field=exc.field, rule=exc.rule)
    return Response(body, status_code=exc.status_code)


def validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    detail = str(exc.detail)
    field = None
    if isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        if isinstance(first, dict):
            field = str(first.get("key") or "") or None
            detail = str(first.get("message") or detail)
    body = Problem(status_code=HTTP_400_BAD_REQUEST, detail=detail, field=field)
    return Response(body, status_code=HTTP_400_BAD_REQUEST)


def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    body = Problem(status_code=exc.status_code, detail=str(exc.detail))
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.warning("api.nats_unavailable", error=str(exc))
    body = Problem(status_code=503, detail="event store unavailable, retry shortly")
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


def conflict(_: Request[Any, Any, Any], exc: ConcurrencyConflict) -> Response[Problem]:
    body = Problem(status_code=409, detail=f"concurrent update, retry: {exc}")
    return Response(body, status_code=409)


EXCEPTION_HANDLERS = {
    Rejected: rejected,
    ValidationException: validation,
    HTTPException: http_error,
    ConcurrencyConflict: conflict,
    nats.errors.TimeoutError: unavailable,
    nats.errors.NoRespondersError: unavailable,
    nats.errors.ConnectionClosedError: unavailable,
}
