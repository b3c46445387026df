"""Consent as a pure decider: ``decide(consent, cmd, meta) -> events``.

The fold is ``schemas.consent_state`` (shared with the dispatcher and runners); no
clock, ids, tokens or I/O in here: ``Meta`` and the commands bring them in.

The rules: a claim never undoes a verification (409: revoke it first, or verify again
to renew); claiming a claimed or failed domain keeps its token; a verification is
recorded against the token it checked, and never on a revoked consent (its token is
retired: claim it again for a new one). Caps stay within the server's ceiling: asked
for beyond it is a 400 naming the cap and the ceiling, the defaults are lowered to it.
A consent covers subdomains only when its claim asked for it and DNS verified it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from msgspec.structs import replace

from engine.errors import Conflict, Invalid, NotFound
from engine.jobs.decider import Meta
from schemas.consent_state import Consent, ConsentStatus, consent_ports
from schemas.events import (
    ConsentEvents,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
)
from schemas.values import ConsentCaps

__all__ = [
    "CEILING_SETTINGS",
    "CONSENT_VALIDITY",
    "ClaimDomain",
    "ConsentCommand",
    "Meta",
    "RecordVerification",
    "RevokeConsent",
    "caps_asked",
    "decide",
    "ensure_verifiable",
    "within_ceiling",
]

CONSENT_VALIDITY = timedelta(days=30)
TOKEN_REMOVED = "token removed"  # the ConsentRevoked reason when re-verification misses it
# the settings that set the ceiling of each cap, named in the 400 that refuses a cap
CEILING_SETTINGS = {
    "max_concurrent": "TB_CONSENT_MAX_SESSIONS",
    "max_flows_per_minute": "TB_CONSENT_MAX_FLOWS_PER_MINUTE",
}

E = TypeVar("E", bound=ConsentEvents)


@dataclass(frozen=True)
class ClaimDomain:
    domain: str
    token: str  # a fresh token, used only when the claim starts over
    caps: ConsentCaps | None = None  # asked for; None: the defaults
    include_subdomains: bool = False
    ceiling: ConsentCaps | None = None


@dataclass(frozen=True)
class RecordVerification:
    """What fetching the consent's token found: ``failure`` is None when it was served."""

    domain: str
    token: str  # the token that was looked for
    evidence: str  # where it was looked for
    failure: str | None = None
    caps: ConsentCaps | None = None  # None keeps the consent's caps
    validity: timedelta = CONSENT_VALIDITY
    method: Literal["well-known", "dns"] = "well-known"
    ceiling: ConsentCaps | None = None  # the server's; None: none beyond the caps' bounds


@dataclass(frozen=True)
class RevokeConsent:
    domain: str
    reason: str = ""


ConsentCommand = ClaimDomain | RecordVerification | RevokeConsent


def ensure_verifiable(consent: Consent, domain: str) -> None:
    """Raise unless ``consent`` has a token a verification could find."""
    if consent.status == ConsentStatus.NONE:
        raise NotFound("domain", f"{domain} has not been claimed: POST /api/v1/consents first")
    if consent.status == ConsentStatus.REVOKED or not consent.token:
        raise Conflict("domain", f"{domain} is revoked and its token retired; claim it again")


def within_ceiling(caps: ConsentCaps, ceiling: ConsentCaps | None, field: str = "caps") -> None:
    """Raise ``Invalid`` naming the first cap above the server's ceiling."""
    if ceiling is None:
        return
    for name, setting in CEILING_SETTINGS.items():
        asked, most = getattr(caps, name), getattr(ceiling, name)
        if asked > most:
            raise Invalid(
                f"{field}.{name}",
                f"must be at most {most}, the server's ceiling ({setting}; got {asked})",
            )


def caps_asked(
    asked: dict[str, int | None], ceiling: ConsentCaps | None, base: ConsentCaps | None = None
) -> ConsentCaps:
    """The caps a claimant asked for, each within the ceiling (``Invalid`` naming the
    first above it); one not asked for keeps its value in ``base`` (default: the
    defaults), lowered to the ceiling."""
    given = {name: value for name, value in asked.items() if value is not None}
    caps = replace(lowered_to(base or ConsentCaps(), ceiling), **given)
    within_ceiling(caps, ceiling)
    return caps


def lowered_to(caps: ConsentCaps, ceiling: ConsentCaps | None) -> ConsentCaps:
    """``caps`` with each one above the ceiling lowered to it."""
    if ceiling is None:
        return caps
    return replace(
        caps,
        max_concurrent=min(caps.max_concurrent, ceiling.max_concurrent),
        max_flows_per_minute=min(caps.max_flows_per_minute, ceiling.max_flows_per_minute),
    )


def decide(consent: Consent, cmd: ConsentCommand, meta: Meta) -> list[ConsentEvents]:
    domain = cmd.domain
    match cmd:
        case ClaimDomain(token=token, caps=caps, include_subdomains=subdomains):
            if caps is not None:
                within_ceiling(caps, cmd.ceiling)
            if consent.status in (ConsentStatus.NONE, ConsentStatus.REVOKED):
                claimed = _emit(
                    DomainClaimed, meta, domain, token=token, caps=caps,
                    include_subdomains=subdomains,
                )  # fmt: skip
                return [claimed]
            if consent.status == ConsentStatus.VERIFIED:
                raise Conflict(
                    "domain", f"{domain} is verified; revoke it first or verify again to renew"
                )
            return []  # claimed or failed: the token already published stays the one
        case RecordVerification(token=token, evidence=evidence, failure=failure):
            ensure_verifiable(consent, domain)
            if token != consent.token:
                raise Conflict(
                    "domain", f"{domain} was claimed again with a new token; verify again"
                )
            if failure is not None:
                return [_emit(ConsentVerificationFailed, meta, domain, reason=failure)]
            if cmd.caps is not None:
                within_ceiling(cmd.caps, cmd.ceiling)
            return [
                _emit(
                    ConsentGiven,
                    meta,
                    domain,
                    method=cmd.method,
                    evidence=evidence,
                    verified_at=meta.at,
                    expires_at=meta.at + cmd.validity,
                    caps=lowered_to(cmd.caps or consent.caps, cmd.ceiling),
                    ports=sorted(consent_ports(evidence)),
                    include_subdomains=consent.wants_subdomains and cmd.method == "dns",
                )
            ]
        case RevokeConsent(reason=reason):
            if consent.status == ConsentStatus.NONE:
                raise NotFound("domain", f"{domain} has not been claimed")
            if consent.status == ConsentStatus.REVOKED:
                raise Conflict("domain", f"{domain} is already revoked")
            return [_emit(ConsentRevoked, meta, domain, reason=reason)]
    raise AssertionError(f"unhandled command {cmd!r}")


def _emit(kind: type[E], meta: Meta, domain: str, **fields: Any) -> E:
    return kind(id=meta.id, at=meta.at, actor=meta.actor, domain=domain, **fields)
