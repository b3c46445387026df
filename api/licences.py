"""Licences: the plan catalogue, assigning a plan to a user, and the checks every job and
proxy write makes against the caller's plan (403 naming the feature or limit and the plan).

The API checks against the read model (the caller's plan, their running jobs); the
engine checks a job again against the log when it starts it, so what gets past one
replica's read model still meets the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, PathParameter

from api.authz import access, actor_of
from api.inputs import command_id
from api.openapi import problems
from api.services import Services
from engine.errors import Rejected
from engine.licences import LicenceCommands
from projections import queries
from schemas.ids import ID_RULE
from schemas.licences import (
    DEFAULT_PLAN,
    PLANS,
    Feature,
    Limits,
    plan_named,
    refusal,
)
from schemas.values import JobKind, JobSettings, Target


class LicenceRefused(Rejected):
    """The caller's plan does not allow what they asked for: ``field`` names where they
    asked for it, the rule the feature or limit and the plan."""

    status_code = 403


async def check_job(
    services: Services,
    request: Request[Any, Any, Any],
    settings: JobSettings,
    targets: Sequence[Target],
    kind: JobKind = "flows",
) -> None:
    """Refuse (403) a new job the caller's plan does not allow; nothing is appended then."""
    user = actor_of(request)
    plan = plan_named(await queries.plan_of(services.db, user))
    running = await queries.running_jobs(services.db, user)
    found = refusal(plan, settings, targets, running_jobs=running, kind=kind)
    if found is not None:
        raise LicenceRefused(found.field, found.reason)


async def check_feature(
    services: Services, request: Request[Any, Any, Any], feature: Feature, field: str
) -> None:
    plan = plan_named(await queries.plan_of(services.db, actor_of(request)))
    if not plan.grants(feature):
        raise LicenceRefused(field, f"licence: plan '{plan.name}' does not include {feature}")


# -- the admin endpoints ------------------------------------------------------------------


class PlanMatrix(msgspec.Struct):
    """What a plan grants: each feature on or off, each limit (``null``: none)."""

    plan: str
    features: dict[str, bool]
    limits: Limits


class Catalogue(msgspec.Struct):
    default_plan: str  # the plan of a user no plan was assigned to
    plans: list[PlanMatrix]


class AssignLicenceIn(msgspec.Struct, forbid_unknown_fields=True):
    plan: Annotated[
        str, msgspec.Meta(min_length=1, max_length=64, description=f"one of {', '.join(PLANS)}")
    ]


class LicenceAssignedOut(msgspec.Struct):
    user_id: str
    plan: str
    seq: int  # reads can wait for it (``?min_seq=``)


UserIdPath = Annotated[
    str,
    PathParameter(
        description=f"a user id: {ID_RULE}",
        schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
    ),
]


def licences_from_state(state: State) -> LicenceCommands:
    services: Services = state.services
    return LicenceCommands(services.bus)


class LicenceController(Controller):
    path = "/api/v1"
    tags = ["licences"]
    dependencies = {
        "licences": Provide(licences_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @get(
        "/licences",
        summary="The plans: the features each grants and its limits",
        opt=access("viewer"),
    )
    async def catalogue(self) -> Catalogue:
        plans = [msgspec.convert(plan.matrix(), PlanMatrix) for plan in PLANS.values()]
        return Catalogue(default_plan=DEFAULT_PLAN, plans=plans)

    @put(
        "/users/{user_id:str}/licence",
        summary="Assign a plan to a user; their next jobs are checked against it",
        responses=problems(400, 404, 409, 503),
        opt=access("admin"),
    )
    async def assign(
        self,
        request: Request[Any, Any, Any],
        user_id: UserIdPath,
        data: JSONBody[AssignLicenceIn],
        licences: NamedDependency[LicenceCommands],
        command_id: NamedDependency[str],
    ) -> LicenceAssignedOut:
        appended = await licences.assign(user_id, data.plan, actor_of(request), command_id)
        return LicenceAssignedOut(user_id=user_id, plan=data.plan, seq=appended.seq)
