"""Jobs: create, list, read, cancel, pause, resume."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, QueryParameter

from api import licences
from api.authz import access, actor_of
from api.dataset_access import reader_of
from api.deps import services_from_state
from api.dto import Accepted, Created, CreateJobIn, PauseIn
from api.inputs import JobIdPath, command_id, job_id_in_path
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.proxies import check_pool
from api.reads import MIN_SEQ_HELP
from api.reads import wait_for_seq as _wait
from api.services import Services
from api.waiting import with_waiting_detail
from engine.datasets.references import JobReferences, resolve_job
from engine.errors import Conflict, NotFound, Rejected
from engine.jobs.decider import CancelJob
from engine.presence import serving_platforms
from projections import queries
from projections.db import iso
from projections.metrics_views import job_metrics
from projections.queries import FlowView, JobView
from schemas.flow_lifecycle import FlowStatus
from schemas.ids import utcnow
from schemas.values import JobStatus, Platform

MAX_FLOWS_PER_JOB = 1_000_000


async def _settings_given(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The settings fields the body spells out (already validated as ``CreateJobIn``):
    only these override a settings profile's."""
    body = msgspec.json.decode(await request.body())
    settings = body.get("settings") if isinstance(body, dict) else None
    return settings if isinstance(settings, dict) else {}


class JobController(Controller):
    path = "/api/v1/jobs"
    opt = access("viewer")
    tags = ["jobs"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/",
        status_code=201,
        summary="Create a job; the engine starts or refuses it",
        description="Targets inline or from a targets dataset ({id, version}); optional"
        " devices_dataset, settings_profile and proxies_dataset references are resolved once,"
        " here (a proxies version's enabled rows are registered as the job's pool): the job"
        " records the exact versions it used.",
        responses=problems(400, 403, 404, 409, 422, 503),
        opt=access("operator"),
    )
    async def create_job(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CreateJobIn],
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> Created:
        # refused before any reference is resolved: a proxies dataset registers its rows
        platform = data.platform or Platform()
        if (platform.os, platform.browser) not in await serving_platforms(services.bus):
            raise Conflict(
                "platform", f"No available runners online for {platform.os}/{platform.browser}"
            )
        if data.proxies_dataset is not None:
            await licences.check_feature(services, request, "proxy_import", "proxies_dataset")
        job = await resolve_job(
            services.bus,
            reader_of(request),
            JobReferences(
                targets=data.targets_dataset,
                proxies=data.proxies_dataset,
                devices=data.devices_dataset,
                settings=data.settings_profile,
            ),
            targets=data.targets,
            settings=await _settings_given(request),
            proxies=request.app.state.proxies,
        )
        total = sum(t.flows for t in job.targets)
        if total > MAX_FLOWS_PER_JOB:
            raise Rejected("targets", f"at most {MAX_FLOWS_PER_JOB} flows per job (got {total})")
        await check_pool(services.bus, job.settings)
        job_id, appended = await services.jobs.create(
            name=data.name,
            targets=job.targets,
            settings=job.settings,
            platform=platform,
            actor=actor_of(request),
            command_id=command_id,
            allowed=lambda: licences.check_job(services, request, job.settings, job.targets),
            datasets=job.datasets,
        )
        return Created(job_id=job_id, seq=appended.seq)

    @get(
        "/",
        summary="Jobs, newest first, a page at a time",
        responses=problems(400, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def list_jobs(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 50,
        cursor: Cursor = None,
        offset: Annotated[
            int, QueryParameter(ge=0, le=10_000_000, description="jobs to skip (prefer cursor)")
        ] = 0,
        status: Annotated[
            JobStatus | None, QueryParameter(description="only jobs in this status")
        ] = None,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Response[list[JobView]]:
        after = decode_cursor(cursor, str, str) if cursor is not None else None
        await _wait(services, min_seq)
        jobs = await queries.list_jobs(
            services.db, limit=limit + 1, offset=offset, status=status, after=after
        )
        jobs[:limit] = await with_waiting_detail(services.bus, jobs[:limit])
        return page(request, jobs, limit, lambda job: (iso(job.created_at), job.job_id))

    @get(
        "/{job_id:str}/flows",
        summary="A job's flows by id, a page at a time",
        responses=problems(400, 404, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def list_flows(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
        status: Annotated[
            FlowStatus | None, QueryParameter(description="only flows in this status")
        ] = None,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Response[list[FlowView]]:
        job_id = job_id_in_path(job_id)
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        await _wait(services, min_seq)
        if await queries.get_job(services.db, job_id) is None:
            raise NotFound("job_id", f"no job {job_id}")
        flows = await queries.page_of_flows(
            services.db, job_id, limit=limit + 1, status=status, after=after
        )
        return page(request, flows, limit, lambda flow: (flow.flow_id,))

    @get(
        "/{job_id:str}",
        summary="One job with per-target flow and click status",
        responses=problems(400, 404, 409, 503),
    )
    async def get_job(
        self,
        job_id: JobIdPath,
        services: NamedDependency[Services],
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> JobView:
        job_id = job_id_in_path(job_id)
        await _wait(services, min_seq)
        job = await queries.get_job(services.db, job_id)
        if job is None:
            raise NotFound("job_id", f"no job {job_id}")
        [job] = await with_waiting_detail(services.bus, [job])
        metrics = await job_metrics(
            services.db,
            job.job_id,
            status=job.status,
            total=job.flows_total,
            success=job.flows_done,
            fail=job.flows_failed,
            started_at=job.started_at,
            finished_at=job.finished_at,
            now=utcnow(),
        )
        return msgspec.structs.replace(job, metrics=metrics)

    @post(
        "/{job_id:str}/cancel",
        status_code=202,
        summary="Cancel; in-flight flows stop",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def cancel_job(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> Accepted:
        job_id = job_id_in_path(job_id)
        appended = await services.jobs.execute(
            CancelJob(job_id, reason="cancelled by api"), actor_of(request), command_id
        )
        return Accepted(job_id=job_id, seq=appended.seq, status=JobStatus.CANCELLED)

    @post(
        "/{job_id:str}/pause",
        status_code=202,
        summary="Pause: in-flight flows finish, nothing new starts",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def pause_job(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
        data: JSONBody[PauseIn | None] = None,
    ) -> Accepted:
        job_id = job_id_in_path(job_id)
        reason = data.reason if data else "paused by api"
        appended = await services.jobs.pause(job_id, actor_of(request), command_id, reason)
        return Accepted(job_id=job_id, seq=appended.seq, status=JobStatus.PAUSED)

    @post(
        "/{job_id:str}/resume",
        status_code=202,
        summary="Resume a paused job; refused while a host of it has no valid consent",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def resume_job(
        self,
        request: Request[Any, Any, Any],
        job_id: JobIdPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> Accepted:
        job_id = job_id_in_path(job_id)
        appended = await services.jobs.resume(job_id, actor_of(request), command_id)
        return Accepted(job_id=job_id, seq=appended.seq, status=JobStatus.RUNNING)
