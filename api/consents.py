"""Consent: claim a domain, verify control of it, revoke it, list consents."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, QueryParameter

from api.authz import access, actor_of
from api.deps import services_from_state
from api.dto import (
    CapsIn,
    Claimed,
    ClaimIn,
    Rechecked,
    Revoked,
    RevokeIn,
    Verified,
    VerifyIn,
)
from api.inputs import DomainPath, command_id, domain_in_path
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.reads import MIN_SEQ_HELP, wait_for_seq
from api.services import Services
from engine.consent.decider import caps_asked
from engine.consent.dns_txt import record_name
from engine.consent.service import well_known_url
from projections import queries
from projections.queries import ConsentView
from schemas.ids import utcnow
from schemas.values import ConsentCaps


def caps_within_ceiling(
    caps: CapsIn | None, services: Services, base: ConsentCaps | None = None
) -> ConsentCaps | None:
    """The caps asked for, each checked against the server's ceiling (400 naming it); one
    left out keeps its value in ``base`` (default: the defaults)."""
    if caps is None:
        return None
    return caps_asked(caps.asked(), services.consents.policy.ceiling, base)


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
        " is a 409 (revoke it first, or verify again to renew). Caps above the server's"
        " ceiling are a 400 naming the cap and the ceiling.",
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
        token, appended = await services.consents.claim(
            domain,
            actor_of(request),
            command_id,
            caps=caps_within_ceiling(data.caps, services),
            include_subdomains=data.include_subdomains,
        )
        return Claimed(
            domain=domain,
            token=token,
            well_known_url=well_known_url(domain, None),
            dns_record=record_name(domain),
            seq=appended.seq,
        )

    @post(
        "/{domain:str}/verify",
        status_code=200,
        summary="Look for the token (well-known URL or DNS TXT) and record consent"
        " (again, to renew it)",
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
        data = data or VerifyIn()
        # a cap left out keeps the consent's (read here; the caps are the owner's to set)
        current = (await services.consents.load(domain)).caps if data.caps else None
        given, appended = await services.consents.verify(
            domain,
            data.base_url,
            actor_of(request),
            command_id,
            caps=caps_within_ceiling(data.caps, services, current),
            method=data.method,
        )
        return Verified(
            domain=domain,
            status="verified",
            method=given.method,
            evidence=given.evidence,
            verified_at=given.verified_at or given.at,
            expires_at=given.expires_at,
            caps=given.caps,
            include_subdomains=given.include_subdomains,
            seq=appended.seq,
        )

    @post(
        "/{domain:str}/recheck",
        status_code=200,
        summary="Re-verify now: a token gone revokes the consent (reason 'token removed')",
        description="Looks for the token where the consent was verified. Served renews the"
        " expiry; absent revokes the consent, which ends its flows and pauses its jobs;"
        " unreachable records a failed check and leaves the consent until its expiry.",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def recheck(
        self,
        request: Request[Any, Any, Any],
        domain: DomainPath,
        services: NamedDependency[Services],
    ) -> Rechecked:
        result = await services.consents.recheck(domain_in_path(domain), actor_of(request))
        return Rechecked(
            domain=result.domain,
            found=result.found.value,
            status=result.status,
            reason=result.reason,
            seq=result.appended.seq,
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
        description="`expired`: verified, but its expiry has passed; it authorises nothing"
        " until it is verified again.",
        responses=problems(400, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def list_consents(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Response[list[ConsentView]]:
        await wait_for_seq(services, min_seq)
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        consents = await queries.list_consents(services.db, limit=limit + 1, after=after)
        now = utcnow()
        return page(request, [c.at(now) for c in consents], limit, lambda c: (c.domain,))
