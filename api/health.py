"""Liveness and readiness."""

from __future__ import annotations

import structlog
from litestar import Response, get
from litestar.di import NamedDependency, Provide

from api.authz import access
from api.deps import services_from_state
from api.dto import Health, Readiness
from api.openapi import NOT_READY
from api.services import Services
from engine.presence import online_runners

log = structlog.get_logger("tb.api")


@get("/healthz", summary="The process is alive", tags=["health"], opt=access("public"))
async def healthz() -> Health:
    return Health(status="ok")


@get(
    "/readyz",
    opt=access("public"),
    summary="NATS, the projector and at least one runner are up",
    responses=NOT_READY,
    tags=["health"],
    dependencies={"services": Provide(services_from_state, sync_to_thread=False)},
)
async def readyz(services: NamedDependency[Services]) -> Response[Readiness]:
    missing: list[str] = []
    if not services.bus.nc.is_connected:
        missing.append("nats")
    if not services.projector.healthy:
        missing.append("projector")
    last_seq: int | None = None
    if "nats" not in missing:
        try:
            last_seq = await services.bus.last_seq()
            if not any(r.status == "online" for r in await online_runners(services.bus)):
                missing.append("runner")
        except Exception:  # an unreachable KV answers "not ready", not a 500
            log.exception("readyz.presence_unavailable")
            missing.append("nats")
    else:
        missing.append("runner")
    body = Readiness(
        status="not ready" if missing else "ready",
        missing=missing,
        projection_seq=services.projector.position,
        stream_last_seq=last_seq,
        projection_lag=None if last_seq is None else max(last_seq - services.projector.position, 0),
    )
    return Response(body, status_code=503 if missing else 200)
