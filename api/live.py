"""Live updates on /ws, pushed after the projector applies events (no polling)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from litestar.di import NamedDependency, Provide
from litestar.exceptions import WebSocketDisconnect

from api.deps import services_from_state
from api.log_feed import forward_log_lines
from api.services import Services
from projections import proxies as proxy_views
from projections import queries
from projections.proxies import ProxyView
from projections.queries import JobView
from schemas.values import JobStatus


class TargetProgress(msgspec.Struct):
    url: str
    flow_done: int
    flow_target: int
    click_done: int
    click_target: int


class ProgressUpdate(msgspec.Struct, tag="progressUpdate", tag_field="type"):
    job_id: str
    status: str
    total: int
    success: int
    fail: int
    eta_seconds: float | None
    targets: list[TargetProgress]


class ProxyUpdate(msgspec.Struct, tag="proxyUpdate", tag_field="type"):
    """A proxy's health changed (registered, failed, marked bad, checked, restored, retired)."""

    proxy_id: str
    proxy: ProxyView


def progress_update(job: JobView, now: datetime | None = None) -> ProgressUpdate:
    return ProgressUpdate(
        job_id=job.job_id,
        status=job.status,
        total=job.flows_total,
        success=job.flows_done,
        fail=job.flows_failed,
        eta_seconds=eta_seconds(job, now or datetime.now(UTC)),
        targets=[
            TargetProgress(t.url, t.flow_done, t.flow_target, t.click_done, t.click_target)
            for t in job.targets
        ],
    )


def eta_seconds(job: JobView, now: datetime) -> float | None:
    finished = job.flows_done + job.flows_failed
    if job.status != JobStatus.RUNNING or job.started_at is None or finished == 0:
        return None
    elapsed = (now - job.started_at).total_seconds()
    if elapsed <= 0:
        return None
    return round((job.flows_total - finished) * elapsed / finished, 1)


@websocket("/ws", dependencies={"services": Provide(services_from_state, sync_to_thread=False)})
async def live(socket: WebSocket[Any, Any, Any], services: NamedDependency[Services]) -> None:
    await socket.accept()
    updates = services.projector.subscribe()
    incoming = asyncio.create_task(_until_closed(socket))
    log_lines = asyncio.create_task(forward_log_lines(socket))  # logLine messages
    try:
        while not incoming.done():
            next_update = asyncio.create_task(updates.get())
            await asyncio.wait({next_update, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if not next_update.done():
                next_update.cancel()
                break
            update = next_update.result()
            for job_id in sorted(update.job_ids):
                job = await queries.get_job(services.db, job_id)
                if job is not None:
                    await socket.send_text(msgspec.json.encode(progress_update(job)).decode())
            for proxy_id in sorted(update.proxy_ids):
                proxy = await proxy_views.get_proxy(services.db, proxy_id)
                if proxy is not None:
                    pushed = ProxyUpdate(proxy_id, proxy)
                    await socket.send_text(msgspec.json.encode(pushed).decode())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        incoming.cancel()
        log_lines.cancel()
        services.projector.unsubscribe(updates)
        with contextlib.suppress(Exception):
            await socket.close()


async def _until_closed(socket: WebSocket[Any, Any, Any]) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await socket.receive_data(mode="text")
