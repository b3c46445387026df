"""Consent: claim a domain, verify control of it, revoke it, list consents."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody

from api.authz import access, actor_of
from api.deps import services_from_state
from api.dto import Claimed, ClaimIn, Revoked, RevokeIn, Verified, VerifyIn
from api.inputs import DomainPath, command_id, domain_in_path
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.services import Services
from engine.consent.service import well_known_url
from projections import queries
from projections.queries import ConsentView


class ConsentController(Controller):
    path = "/api/v1/consents"
    opt = access("viewer")
    tags = ["consent"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/",
        status_code=201,
        summary="Claim a domain: serve the token to prove control",
        description="Claiming a claimed domain answers its current token; a verified one"
        " is a 409 (revoke it first, or verify again to renew).",
        responses=problems(400, 409, 503),
        opt=access("operator"),
    )
    async def claim(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ClaimIn],
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> Claimed:
        domain = data.domain.lower()
        token, appended = await services.consents.claim(domain, actor_of(request), command_id)
        return Claimed(
            domain=domain,
            token=token,
            well_known_url=well_known_url(domain, None),
            seq=appended.seq,
        )

    @post(
        "/{domain:str}/verify",
        status_code=200,
        summary="Fetch the token and record consent (again, to renew it)",
        responses=problems(400, 404, 409, 422, 503),
        opt=access("operator"),
    )
    async def verify(
        self,
        request: Request[Any, Any, Any],
        domain: DomainPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
        data: JSONBody[VerifyIn | None] = None,
    ) -> Verified:
        domain = domain_in_path(domain)
        given, appended = await services.consents.verify(
            domain, data.base_url if data else None, actor_of(request), command_id
        )
        return Verified(
            domain=domain,
            status="verified",
            evidence=given.evidence,
            expires_at=given.expires_at,
            seq=appended.seq,
        )

    @post(
        "/{domain:str}/revoke",
        status_code=202,
        summary="Revoke: the token is retired, flows on the host end, its jobs pause",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def revoke(
        self,
        request: Request[Any, Any, Any],
        domain: DomainPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
        data: JSONBody[RevokeIn | None] = None,
    ) -> Revoked:
        domain = domain_in_path(domain)
        appended = await services.consents.revoke(
            domain, data.reason if data else "", actor_of(request), command_id
        )
        return Revoked(domain=domain, status="revoked", seq=appended.seq)

    @get(
        "/",
        summary="Every claimed domain and its consent status, by domain, a page at a time",
        responses=problems(400, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def list_consents(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response[list[ConsentView]]:
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        consents = await queries.list_consents(services.db, limit=limit + 1, after=after)
        return page(request, consents, limit, lambda consent: (consent.domain,))
