"""Consent: claim a domain, verify control of it, list consents."""

from __future__ import annotations

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from api.deps import services_from_state
from api.dto import Claimed, ClaimIn, Verified, VerifyIn
from api.openapi import problems
from api.services import Services
from engine.consent import well_known_url
from engine.errors import Invalid
from projections import queries
from projections.queries import ConsentView
from schemas.values import Domain


class ConsentController(Controller):
    path = "/api/v1/consents"
    tags = ["consent"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @post(
        "/",
        status_code=201,
        summary="Claim a domain: serve the token to prove control",
        responses=problems(400, 503),
    )
    async def claim(self, data: JSONBody[ClaimIn], services: NamedDependency[Services]) -> Claimed:
        domain = data.domain.lower()
        token, appended = await services.consents.claim(domain, actor="api")
        return Claimed(
            domain=domain,
            token=token,
            well_known_url=well_known_url(domain, None),
            seq=appended.seq,
        )

    @post(
        "/{domain:str}/verify",
        status_code=200,
        summary="Fetch the token and record consent",
        responses=problems(400, 404, 422, 503),
    )
    async def verify(
        self,
        domain: FromPath[str],
        services: NamedDependency[Services],
        data: JSONBody[VerifyIn | None] = None,
    ) -> Verified:
        domain = _domain(domain)
        given, appended = await services.consents.verify(
            domain, data.base_url if data else None, actor="api"
        )
        return Verified(
            domain=domain,
            status="verified",
            evidence=given.evidence,
            expires_at=given.expires_at.isoformat(),
            seq=appended.seq,
        )

    @get("/", summary="Every claimed domain and its consent status")
    async def list_consents(self, services: NamedDependency[Services]) -> list[ConsentView]:
        return await queries.list_consents(services.db)


def _domain(raw: str) -> str:
    try:
        return msgspec.convert(raw, Domain).lower()
    except msgspec.ValidationError:
        raise Invalid("domain", "must be a host name such as example.com") from None
