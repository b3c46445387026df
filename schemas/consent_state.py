"""A domain's consent as the log tells it: the fold every reader of consent shares.

Consent is verified control of a domain (DESIGN §8). Only a ``ConsentGiven`` that is
still the latest word on the domain (no newer claim or revocation) and has not expired
authorises traffic to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from urllib.parse import urlsplit

from schemas.events import (
    ConsentEvent,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Event,
)
from schemas.values import ConsentCaps

WEB_PORTS = frozenset({80, 443})
DEFAULT_PORTS = {"http": 80, "https": 443}


def consent_ports(evidence: str) -> frozenset[int]:
    """The ports a consent covers: 80 and 443, and the port of the URL it was verified
    on (``evidence``; a DNS record adds none)."""
    try:
        parts = urlsplit(evidence)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        port = None
    return WEB_PORTS | {port} if port else WEB_PORTS


class ConsentStatus(StrEnum):
    NONE = "none"
    CLAIMED = "claimed"
    VERIFIED = "verified"
    FAILED = "failed"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Consent:
    domain: str = ""
    status: ConsentStatus = ConsentStatus.NONE
    token: str = ""  # the claim's token; retired (empty) once revoked
    expires_at: datetime | None = None
    caps: ConsentCaps = ConsentCaps()
    ports: frozenset[int] = WEB_PORTS  # where flows may connect on the domain
    version: int = 0  # stream sequence of the last event applied (0 = none)

    def valid_at(self, now: datetime) -> bool:
        return (
            self.status == ConsentStatus.VERIFIED
            and self.expires_at is not None
            and self.expires_at > now
        )


def evolve_consent(consent: Consent, event: Event, seq: int = 0) -> Consent:
    if not isinstance(event, ConsentEvent):
        return consent
    if seq and seq <= consent.version:
        return consent  # already folded in (a reader that ran ahead sees it again)
    consent = replace(consent, domain=event.domain.lower(), version=max(consent.version, seq))
    match event:
        case DomainClaimed(token=token):
            return replace(consent, status=ConsentStatus.CLAIMED, token=token, expires_at=None)
        case ConsentGiven(expires_at=expires_at, caps=caps, ports=ports, evidence=evidence):
            return replace(
                consent,
                status=ConsentStatus.VERIFIED,
                expires_at=expires_at,
                caps=caps,
                ports=frozenset(ports) or consent_ports(evidence),
            )
        case ConsentVerificationFailed():
            # a failed re-check does not cancel an earlier, still valid verification
            if consent.status == ConsentStatus.VERIFIED:
                return consent
            return replace(consent, status=ConsentStatus.FAILED)
        case ConsentRevoked():
            return replace(consent, status=ConsentStatus.REVOKED, token="", expires_at=None)
    return consent
