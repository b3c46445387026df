"""Consent as a pure decider: ``decide(consent, cmd, meta) -> events``.

The fold is ``schemas.consent_state`` (shared with the dispatcher and runners); no
clock, ids, tokens or I/O in here: ``Meta`` and the commands bring them in.

The rules: a claim never undoes a verification (409: revoke it first, or verify again
to renew); claiming a claimed or failed domain keeps its token; a verification is
recorded against the token it checked, and never on a revoked consent (its token is
retired: claim it again for a new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from engine.errors import Conflict, NotFound
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
    "CONSENT_VALIDITY",
    "ClaimDomain",
    "ConsentCommand",
    "Meta",
    "RecordVerification",
    "RevokeConsent",
    "decide",
    "ensure_verifiable",
]

CONSENT_VALIDITY = timedelta(days=30)

E = TypeVar("E", bound=ConsentEvents)


@dataclass(frozen=True)
class ClaimDomain:
    domain: str
    token: str  # a fresh token, used only when the claim starts over


@dataclass(frozen=True)
class RecordVerification:
    """What fetching the consent's token found: ``failure`` is None when it was served."""

    domain: str
    token: str  # the token that was looked for
    evidence: str  # where it was looked for
    failure: str | None = None
    caps: ConsentCaps | None = None  # None keeps the consent's caps
    validity: timedelta = CONSENT_VALIDITY


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


def decide(consent: Consent, cmd: ConsentCommand, meta: Meta) -> list[ConsentEvents]:
    domain = cmd.domain
    match cmd:
        case ClaimDomain(token=token):
            if consent.status in (ConsentStatus.NONE, ConsentStatus.REVOKED):
                return [_emit(DomainClaimed, meta, domain, token=token)]
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
            return [
                _emit(
                    ConsentGiven,
                    meta,
                    domain,
                    evidence=evidence,
                    expires_at=meta.at + cmd.validity,
                    caps=cmd.caps or consent.caps,
                    ports=sorted(consent_ports(evidence)),
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
