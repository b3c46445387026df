"""Map errors to bodies that name the field and the rule; a 5xx is logged with its traceback.

4xx: the caller can act on it (``Problem.field`` and ``Problem.rule``). 5xx: the body
says nothing about internals; the log line (with ``error_id``) says everything.
"""

from __future__ import annotations

import re
from typing import Any

import nats.errors
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from api.dto import Problem
from engine.bus import ConcurrencyConflict
from engine.errors import Rejected
from projections.projector import ProjectorFailed
from schemas.ids import new_id

log = structlog.get_logger("tb.api")

# msgspec names a missing or unknown field in its message, at the path of its parent
_NAMED_FIELD = re.compile(r"Object (?:missing required|contains unknown) field `([^`]+)`")
# a value type's own check (``__post_init__``) says "<field> <rule>", e.g. "url must …"
_FIELD_RULE = re.compile(r"([a-z_][a-z0-9_]*) (.+)", re.DOTALL)
BODY_PARAMETER = "data"  # every handler takes its JSON body as ``data``


def rejected(_: Request[Any, Any, Any], exc: Rejected) -> Response[Problem]:
    body = Problem(status_code=exc.status_code, detail=str(exc), field=exc.field, rule=exc.rule)
    return Response(body, status_code=exc.status_code)


def validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    field, rule = None, str(exc.detail)
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict):
        first = exc.extra[0]
        field, rule = field_and_rule(str(first.get("key") or ""), str(first.get("message") or rule))
    detail = f"{field}: {rule}" if field else rule
    body = Problem(status_code=HTTP_400_BAD_REQUEST, detail=detail, field=field, rule=rule)
    return Response(body, status_code=HTTP_400_BAD_REQUEST)


def field_and_rule(key: str, message: str) -> tuple[str | None, str]:
    """The full path of the field a decode error is about (``targets[0].url``) and the rule."""
    if key == BODY_PARAMETER:
        key = ""  # the body's own top level: Litestar names it after the handler's parameter
    if named := _NAMED_FIELD.match(message):
        return _join(key, named.group(1)), message
    if own := _FIELD_RULE.fullmatch(message):
        return _join(key, own.group(1)), own.group(2)
    return key or None, message


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    if exc.status_code >= HTTP_500_INTERNAL_SERVER_ERROR:
        return internal_error(request, exc)
    rule = str(exc.detail)
    # the body could not be read at all (not JSON, too large): the field is the body
    field = "body" if exc.status_code in (400, 413) else None
    detail = f"{field}: {rule}" if field else rule
    body = Problem(status_code=exc.status_code, detail=detail, field=field, rule=rule)
    return Response(body, status_code=exc.status_code, headers=exc.headers)


def unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    log.warning("api.nats_unavailable", error=str(exc))
    body = Problem(status_code=503, detail="event store unavailable, retry shortly")
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


def read_model_down(_: Request[Any, Any, Any], exc: ProjectorFailed) -> Response[Problem]:
    log.error("api.projector_failed", error=str(exc), exc_info=exc)
    body = Problem(status_code=503, detail="read model stopped; see /readyz and the API log")
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


def conflict(_: Request[Any, Any, Any], exc: ConcurrencyConflict) -> Response[Problem]:
    body = Problem(status_code=409, detail=f"concurrent update, retry: {exc}")
    return Response(body, status_code=409)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """Anything unexpected: logged with its traceback, answered without internals."""
    error_id = new_id()
    status = getattr(exc, "status_code", HTTP_500_INTERNAL_SERVER_ERROR)
    log.error(
        "api.internal_error",
        error_id=error_id,
        method=request.method,
        path=request.url.path,
        status=status,
        exc_info=exc,
    )
    body = Problem(status_code=status, detail=f"internal error {error_id}; see the API log")
    return Response(body, status_code=status)


EXCEPTION_HANDLERS = {
    Rejected: rejected,
    ValidationException: validation,
    HTTPException: http_error,
    ConcurrencyConflict: conflict,
    nats.errors.TimeoutError: unavailable,
    nats.errors.NoRespondersError: unavailable,
    nats.errors.ConnectionClosedError: unavailable,
    ProjectorFailed: read_model_down,
    HTTP_500_INTERNAL_SERVER_ERROR: internal_error,
    Exception: internal_error,
}
