"""Log ingest: external workers post job log lines (``POST /api/crawler/log``, and
``POST /api/v1/logs``); an external job's progress and summary lines move its job.

The legacy path answers what crawler-style workers already read: 200
``{"status":"success","job_id","message":"Log message received and queued"}``, 404
``Job <job_id> not found or already completed``, 422 for a body that is not a log
line (the v1 path keeps the API's 400), 403 ``Invalid API key``.
"""

from __future__ import annotations

import hmac
import re
from typing import Annotated, Any, Literal

import msgspec
import structlog
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, JSONBody

from api.authz import access, principal_of
from api.deps import services_from_state
from api.dto import Problem
from api.errors import http_error, rejected, validation
from api.identity import sent_by_a_browser
from api.inputs import IDEMPOTENCY_KEY, KEY_PATTERN, KEY_RULE
from api.openapi import problems
from api.services import Services
from engine.bus import ConcurrencyConflict, applied_by
from engine.errors import Conflict, Invalid, Rejected
from engine.identity.api_keys import looks_like_key
from engine.job_logs import ENDING_TYPES, last_job_event_type
from engine.jobs.decider import EndExternalJob, ReportProgress
from projections import queries
from schemas import subjects
from schemas.ids import is_valid_id, utcnow
from schemas.logs import LOG_SOURCE_INGEST, MESSAGE_LENGTH, log_line, progress_of, summary_of
from schemas.values import TERMINAL_JOB_STATUSES, Id, JobKind

log = structlog.get_logger("tb.api")

API_KEY_HEADER = "X-API-Key"
RECEIVED = "Log message received and queued"
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


class Said(Rejected):
    """A refusal whose ``detail`` is said exactly as existing clients read it."""

    def __init__(self, status_code: int, field: str, message: str) -> None:
        super().__init__(field, message)
        self.status_code = status_code

    def __str__(self) -> str:
        return self.rule


def not_open(job_id: str) -> Said:
    return Said(404, "job_id", f"Job {job_id} not found or already completed")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.") or host == "::ffff:127.0.0.1"


def ingest_key_guard(connection: Any, _: BaseRouteHandler) -> None:
    """With an ingest key configured, ``X-API-Key`` must be it (compared in constant
    time); without one, only loopback clients may post."""
    if principal_of(connection) is not None:
        return  # a user's API key that may post logs (the access guard checked it)
    given_user_key = looks_like_key(connection.headers.get(API_KEY_HEADER) or "")
    if given_user_key:
        raise Said(403, API_KEY_HEADER, "Invalid API key")
    services: Services = connection.app.state.services
    key = services.config.logs.ingest_api_key
    if key:
        given = connection.headers.get(API_KEY_HEADER) or ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise Said(403, API_KEY_HEADER, "Invalid API key")
        return
    host = connection.client.host if connection.client else ""
    # a reverse proxy on this machine connects from loopback for every client it forwards,
    # and so does a browser on it for whatever page it shows (whatever its Origin says)
    forwarded = any(name in connection.headers for name in FORWARDING_HEADERS)
    if forwarded or not is_loopback(host) or sent_by_a_browser(connection):
        raise Said(
            403,
            API_KEY_HEADER,
            "Invalid API key: without TB_INGEST_API_KEY, log ingest is open to loopback"
            " clients only",
        )


# -- bodies ---------------------------------------------------------------------------


class LegacyLogIn(msgspec.Struct):
    """As crawler-style workers post it (other fields are ignored, as they always were)."""

    job_id: Annotated[str, msgspec.Meta(max_length=200)]
    message: Annotated[str, msgspec.Meta(max_length=MESSAGE_LENGTH)]


class LogIn(msgspec.Struct, forbid_unknown_fields=True):
    job_id: Id
    message: Annotated[str, msgspec.Meta(min_length=1, max_length=MESSAGE_LENGTH)]


class LogReceived(msgspec.Struct):
    status: Literal["success"]
    job_id: str
    message: str


def unprocessable(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """The legacy paths answer 422 for a body that is not what they take (empty, not
    JSON, a field missing or of the wrong type), naming the field and the rule."""
    if isinstance(exc, ValidationException):
        answer = validation(request, exc)
    elif isinstance(exc, HTTPException) and exc.status_code == 400:
        answer = http_error(request, exc)
    elif isinstance(exc, Invalid) and exc.field == "body":  # e.g. nested too deep
        answer = rejected(request, exc)
    elif isinstance(exc, Rejected):
        return rejected(request, exc)
    else:
        return http_error(request, exc)  # type: ignore[arg-type]
    body = answer.content
    assert isinstance(body, Problem)
    return Response(msgspec.structs.replace(body, status_code=422), status_code=422)


LEGACY_422 = {
    ValidationException: unprocessable,
    HTTPException: unprocessable,
    Rejected: unprocessable,
}


# -- taking a line -----------------------------------------------------------------------


async def open_job_kind(services: Services, job_id: str) -> JobKind | None:
    """The job's kind while it is open (not ended), else ``None``. Whether it ended is
    read from the last event stored on its subjects, not only from the read model, so a
    line that comes right after a cancel or a summary is refused."""
    if not is_valid_id(job_id):
        return None
    view = await queries.get_job(services.db, job_id)
    if view is not None and view.status in TERMINAL_JOB_STATUSES:
        return None
    last = await last_job_event_type(services.bus, job_id)
    if last is None or last in ENDING_TYPES:
        return None
    if view is not None:
        return view.kind
    return (await services.jobs.load(job_id)).kind  # created a moment ago


async def take_line(services: Services, job_id: str, message: str, key: str | None) -> None:
    """Store the line in the job's log; on an external job a progress line sets its
    progress and a ``[SUMMARY]`` line ends it."""
    kind = await open_job_kind(services, job_id)
    if kind is None:
        if key and is_valid_id(job_id) and await ended_by(services, job_id, key):
            return  # a retry of the summary that ended the job: taken the first time
        raise not_open(job_id)
    summary = summary_of(message)
    line = log_line(job_id, message, utcnow(), LOG_SOURCE_INGEST, summary)
    msg_id = subjects.ingest_log_msg_id(job_id, key) if key else None
    await services.bus.append_log(line, msg_id)
    log.info("[LOG RECEIVED]", job_id=job_id, message=message[:200])
    if kind != "external":
        return
    command_id = line_command_id(key) if key else None
    try:
        if summary is not None:
            end = EndExternalJob(job_id, summary.succeeded, summary.outcome)
            await services.jobs.execute(end, LOG_SOURCE_INGEST, command_id)
        elif (percent := progress_of(message)) is not None:
            progress = ReportProgress(job_id, percent, message)
            await services.jobs.execute(progress, LOG_SOURCE_INGEST, command_id)
    except Conflict:
        pass  # the job ended meanwhile (cancelled): the line is kept, the job stays ended
    except ConcurrencyConflict:
        if summary is not None:
            raise
        # many progress lines at once: the line is kept, and the next one sets progress


async def ended_by(services: Services, job_id: str, key: str) -> bool:
    """Whether the post named ``key`` is what ended the job (its summary)."""
    history = await services.bus.load(subjects.job_stream_filter(job_id))
    return applied_by(history, line_command_id(key)) is not None


def line_command_id(key: str) -> str:
    return f"log:{key}"


async def received(services: Services, data: LogIn | LegacyLogIn, key: str | None) -> LogReceived:
    await take_line(services, data.job_id, data.message, checked_key(key))
    return LogReceived(status="success", job_id=data.job_id, message=RECEIVED)


def checked_key(key: str | None) -> str | None:
    if key is not None and not _KEY.fullmatch(key):
        raise Invalid(IDEMPOTENCY_KEY, KEY_RULE)
    return key


IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=IDEMPOTENCY_KEY,
        required=False,
        description="names this line: a retried post with the same key is stored once",
        schema_extra={"pattern": KEY_PATTERN, "minLength": 1, "maxLength": 128},
    ),
]
ApiKey = Annotated[
    str | None,
    HeaderParameter(
        name=API_KEY_HEADER,
        required=False,
        description="the ingest key (TB_INGEST_API_KEY); without one set, loopback only",
    ),
]
_KEY = re.compile(KEY_PATTERN.strip("^$"))
FORBIDDEN = {
    403: ResponseSpec(
        data_container=Problem, description="X-API-Key missing or wrong (Invalid API key)"
    )
}


class LegacyLogIngest(Controller):
    opt = access("ingest")
    path = "/api/crawler"
    tags = ["logs (crawler-compatible)"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}
    guards = [ingest_key_guard]
    exception_handlers = LEGACY_422  # type: ignore[assignment]

    @post(
        "/log",
        status_code=200,
        summary="Post a job log line (crawler-compatible answers)",
        responses={**problems(404, 422), **FORBIDDEN},
    )
    async def post_log(
        self,
        data: JSONBody[LegacyLogIn],
        services: NamedDependency[Services],
        idempotency_key: IdempotencyKey = None,
        x_api_key: ApiKey = None,
    ) -> LogReceived:
        return await received(services, data, idempotency_key)


class LogIngest(Controller):
    opt = access("ingest")
    path = "/api/v1/logs"
    tags = ["logs"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}
    guards = [ingest_key_guard]

    @post(
        "/",
        status_code=200,
        summary="Post a job log line (an external worker's)",
        responses={**problems(400, 404), **FORBIDDEN},
    )
    async def post_log(
        self,
        data: JSONBody[LogIn],
        services: NamedDependency[Services],
        idempotency_key: IdempotencyKey = None,
        x_api_key: ApiKey = None,
    ) -> LogReceived:
        return await received(services, data, idempotency_key)
