"""External jobs on the crawler-compatible paths: start, status, cancel.

An external job has no targets and is never dispatched: its worker does the work and
reports by log lines (``api.log_ingest``). It is a job like any other in the log
(``JobCreated`` of kind ``external``, then ``JobStarted``, ``JobProgressed``, and
``JobCompleted``, ``JobFailed`` or ``JobCancelled``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import Body, QueryParameter

from api import licences
from api.authz import access, actor_of
from api.deps import services_from_state
from api.identity import INGEST_BY_SESSION
from api.inputs import JobIdPath, command_id
from api.log_ingest import LEGACY_422, Said, ingest_key_guard, not_open
from api.openapi import problems
from api.reads import MIN_SEQ_HELP, wait_for_seq
from api.services import Services
from engine.errors import Conflict, NotFound
from engine.jobs.decider import CancelJob
from projections import queries
from schemas.ids import is_valid_id
from schemas.values import JobSettings, JobStatus, Platform

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class ExternalJobIn(msgspec.Struct):
    """Other fields (a worker's own inputs) are accepted and not kept."""

    name: Name = "external job"


class ExternalStarted(msgspec.Struct):
    job_id: str
    status: Literal["started"]
    message: str
    seq: int  # reads can wait for it (``?min_seq=``)


class ExternalStatus(msgspec.Struct, omit_defaults=True):
    """``progress``: the percent its worker last reported (100 once completed);
    ``message``: the line that reported it, or why the job ended as it did."""

    job_id: str
    status: JobStatus
    kind: str
    progress: int
    message: str = ""


class ExternalCancelled(msgspec.Struct):
    job_id: str
    status: Literal["cancelled"]
    message: str
    seq: int


class CrawlerJobs(Controller):
    path = "/api/crawler"
    opt = access("ingest") | {INGEST_BY_SESSION: True}
    guards = [ingest_key_guard]
    tags = ["logs (crawler-compatible)"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }
    exception_handlers = LEGACY_422  # type: ignore[assignment]

    @post(
        "/start",
        status_code=200,
        summary="Open an external job: its worker reports by log lines",
        responses=problems(403, 422),
    )
    async def start(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
        data: Annotated[ExternalJobIn | None, Body(title="ExternalJobIn")] = None,
    ) -> ExternalStarted:
        job_id, appended = await services.jobs.create(
            name=(data or ExternalJobIn()).name,
            targets=[],
            settings=JobSettings(),
            platform=Platform(),
            actor=actor_of(request),
            command_id=command_id,
            kind="external",
            # it runs at once: it counts towards the caller's concurrent jobs
            allowed=lambda: licences.check_job(
                services, request, JobSettings(), [], kind="external"
            ),
        )
        message = f"Job {job_id} started: its worker posts its log to /api/crawler/log"
        return ExternalStarted(job_id=job_id, status="started", message=message, seq=appended.seq)

    @get(
        "/status/{job_id:str}",
        summary="An external job's status",
        # the crawler paths answer bad input with 422, as their clients expect
        responses=problems(404, 409, 422),
    )
    async def status(
        self,
        job_id: JobIdPath,
        services: NamedDependency[Services],
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> ExternalStatus:
        await wait_for_seq(services, min_seq)
        return await job_status(services, job_id)

    @post(
        "/cancel/{job_id:str}",
        status_code=200,
        summary="Cancel a job (crawler-compatible answers)",
        responses=problems(404, 422),
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> ExternalCancelled:
        if not is_valid_id(job_id):
            raise not_open(job_id)
        try:
            appended = await services.jobs.execute(
                CancelJob(job_id, reason="cancelled by api"), actor_of(request), command_id
            )
        except (NotFound, Conflict):
            raise not_open(job_id) from None
        return ExternalCancelled(
            job_id=job_id, status="cancelled", message=f"Job {job_id} cancelled", seq=appended.seq
        )


async def job_status(services: Services, job_id: str) -> ExternalStatus:
    """From the read model; a job it does not hold yet (created a moment ago) from the log."""
    view = await queries.get_job(services.db, job_id)
    if view is not None:
        done = view.status == JobStatus.COMPLETED
        return ExternalStatus(
            job_id=job_id,
            status=view.status,
            kind=view.kind,
            progress=100 if done else view.progress or 0,
            message=view.reason or view.progress_message or "",
        )
    if is_valid_id(job_id):
        job = await services.jobs.load(job_id)
        if job.version:
            return ExternalStatus(
                job_id=job_id, status=job.status, kind=job.kind, progress=job.progress
            )
    raise Said(404, "job_id", f"Job {job_id} not found")
