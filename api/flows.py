"""Flows: the screenshot a runner stored when an attempt failed."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get
from litestar.di import NamedDependency, Provide
from litestar.params import PathParameter, QueryParameter

from api.authz import access
from api.deps import services_from_state
from api.openapi import problems
from api.services import Services
from engine.errors import Invalid, NotFound
from engine.screenshots import failure_screenshot
from projections import queries
from schemas.ids import ID_RULE, is_valid_id

FlowIdPath = Annotated[
    str,
    PathParameter(
        description=f"a flow id: {ID_RULE}",
        schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
    ),
]


class FlowController(Controller):
    path = "/api/v1/flows"
    opt = access("viewer")
    tags = ["flows"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/{flow_id:str}/screenshot",
        summary="The page as a failed attempt of the flow left it (PNG)",
        media_type="image/png",
        responses=problems(400, 404, 503),
    )
    async def screenshot(
        self,
        flow_id: FlowIdPath,
        services: NamedDependency[Services],
        attempt: Annotated[
            int | None,
            QueryParameter(ge=1, description="which attempt (default: the latest that failed)"),
        ] = None,
    ) -> Response[bytes]:
        if not is_valid_id(flow_id):
            raise Invalid("flow_id", ID_RULE)
        flow = await queries.get_flow(services.db, flow_id)
        if flow is None:
            raise NotFound("flow_id", f"no flow {flow_id}")
        if attempt is not None and attempt > flow.attempt:
            raise NotFound("attempt", f"flow {flow_id} has had {flow.attempt} attempt(s)")
        png = await failure_screenshot(services.bus, flow.job_id, flow_id, attempt)
        return Response(png, media_type="image/png")
