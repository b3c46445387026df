"""One job's live updates as Server-Sent Events: the messages ``/ws`` sends about it.

Each message is one event, ``data: <json>`` (its ``type`` inside, as on ``/ws``); a
``: keepalive`` comment goes out after 15 s of quiet (``live_keepalive``). The stream
opens with the job's current ``jobInfo`` and ``progressUpdate`` and ends after the
update that shows the job closed (completed, failed, cancelled or refused). A client
that leaves ``live_queue`` updates unread is cut off (its connection closed) and counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Request, get
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api.authz import access
from api.deps import services_from_state
from api.inputs import JobIdPath, job_id_in_path
from api.live import hub_from_state
from api.live_auth import SSE_SESSION_EXPIRED, until_session_ends
from api.live_hub import LiveHub
from api.live_messages import JobMessage
from api.openapi import problems
from api.reads import MIN_SEQ_HELP, wait_for_seq
from api.services import Services
from engine.errors import NotFound
from projections import queries


@get(
    "/api/v1/jobs/{job_id:str}/events/stream",
    opt=access("viewer"),
    summary="One job's live updates as Server-Sent Events (jobInfo, progressUpdate, "
    "flowDoneUpdate, clickDoneUpdate, ...), ending when the job closes",
    tags=["jobs"],
    media_type="text/event-stream",
    responses={
        200: ResponseSpec(
            data_container=JobMessage,
            generate_examples=False,
            media_type="text/event-stream",
            description="``data: <message>`` events, each one of these (its ``type`` "
            "says which), and ``: keepalive`` comments",
        ),
        **problems(400, 404, 409, 503),
    },
    dependencies={
        "services": Provide(services_from_state, sync_to_thread=False),
        "hub": Provide(hub_from_state, sync_to_thread=False),
    },
)
async def job_events(
    request: Request[Any, Any, Any],
    job_id: JobIdPath,
    services: NamedDependency[Services],
    hub: NamedDependency[LiveHub],
    min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
) -> ServerSentEvent:
    job_id = job_id_in_path(job_id)
    await wait_for_seq(services, min_seq)
    if await queries.get_job(services.db, job_id) is None:
        raise NotFound("job_id", f"no job {job_id}")
    stream = job_stream(hub, job_id, services.config.live_keepalive)
    return ServerSentEvent(until_session_ends(request, stream, SSE_SESSION_EXPIRED))


async def job_stream(
    hub: LiveHub, job_id: str, keepalive: float
) -> AsyncIterator[ServerSentEventMessage]:
    """Runs in the task that writes the response: a client that stops reading blocks
    that task in its write, so being cut off cancels the task, which closes the
    connection."""
    writer = asyncio.current_task()
    listener = hub.listen({job_id}, fleet=False)
    if writer is not None:
        listener.on_overflow = writer.cancel
    try:
        await hub.snapshot(listener, {job_id})
        while not listener.overflowed.is_set():
            try:
                async with asyncio.timeout(keepalive):
                    bundle = await listener.queue.get()
            except TimeoutError:
                yield ServerSentEventMessage(data=None, comment="keepalive")
                continue
            for frame in bundle:
                yield ServerSentEventMessage(data=frame.text)
                if frame.ends_job:
                    return
    finally:
        hub.unlisten(listener)
