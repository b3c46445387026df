"""A domain's consent as the log tells it: the fold every reader of consent shares.

Consent is verified control of a domain (DESIGN §8). Only a ``ConsentGiven`` that is
still the latest word on the domain (no newer claim or revocation) and has not expired
authorises traffic to it. An expired consent authorises nothing and is treated as
revoked: its flows end and its jobs pause until it is verified again.

A host is governed by its own consent when it has a verified or revoked one; else by
the nearest parent domain whose consent covers subdomains (claimed with
``include_subdomains`` and verified by DNS). ``governing`` is that rule, for every reader.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
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
    # never folded in: what a verified consent past its expiry is at a given time
    # (``status_at``), as every reader reports it
    EXPIRED = "expired"


def status_at(status: ConsentStatus, expires_at: datetime | None, now: datetime) -> ConsentStatus:
    """A consent's status at ``now``: a verified one whose expiry has passed (or that has
    none) is expired, and authorises nothing until it is verified again."""
    if status == ConsentStatus.VERIFIED and (expires_at is None or expires_at <= now):
        return ConsentStatus.EXPIRED
    return status


@dataclass(frozen=True)
class Consent:
    domain: str = ""
    status: ConsentStatus = ConsentStatus.NONE
    token: str = ""  # the claim's token; retired (empty) once revoked
    expires_at: datetime | None = None
    caps: ConsentCaps = ConsentCaps()
    ports: frozenset[int] = WEB_PORTS  # where flows may connect on the domain
    version: int = 0  # stream sequence of the last event applied (0 = none)
    method: str = ""  # how it was last verified: "well-known" or "dns"
    evidence: str = ""  # the URL or record that served the token
    verified_at: datetime | None = None
    checked_at: datetime | None = None  # the last look for its token, found or not
    wants_subdomains: bool = False  # the claim asked to cover subdomains
    include_subdomains: bool = False  # the verification granted it (by DNS)

    def status_at(self, now: datetime) -> ConsentStatus:
        return status_at(self.status, self.expires_at, now)

    def valid_at(self, now: datetime) -> bool:
        return self.status_at(now) == ConsentStatus.VERIFIED

    @property
    def governs_itself(self) -> bool:
        """Whether this record, not a parent domain's, decides for its own host."""
        return self.status in (ConsentStatus.VERIFIED, ConsentStatus.REVOKED)


def lapse_reason(consent: Consent | None, host: str) -> str:
    """Why flows on ``host`` stop (the JobPaused reason): its consent was revoked, expired,
    or no longer covers it (a parent verified again without its subdomains)."""
    if consent is None or consent.status not in (ConsentStatus.VERIFIED, ConsentStatus.REVOKED):
        return f"no valid consent for {host}"
    if consent.status == ConsentStatus.REVOKED:
        return f"consent revoked for {host}"
    return f"consent expired for {host}"


def parent_domains(host: str) -> Iterator[str]:
    """The domains above ``host`` a consent with subdomains could come from, nearest
    first; none for an IP address or a one-label name."""
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.split(".")
    for n in range(1, len(labels) - 1):
        yield ".".join(labels[n:])


def consent_domains(host: str) -> list[str]:
    """Every domain whose consent may govern ``host``: itself, then its parents."""
    return [host.lower().rstrip("."), *parent_domains(host)]


def governing(
    lookup: Mapping[str, Consent] | Callable[[str], Consent | None], host: str
) -> Consent | None:
    """The consent that decides for ``host``: its own when verified or revoked, else the
    nearest parent's that covers subdomains, else its own (claimed, failed) or ``None``."""
    get = lookup.get if isinstance(lookup, Mapping) else lookup
    own = get(host.lower().rstrip("."))
    if own is not None and own.governs_itself:
        return own
    for parent in parent_domains(host):
        consent = get(parent)
        if consent is not None and consent.governs_itself and consent.include_subdomains:
            return consent
    return own


def evolve_consent(consent: Consent, event: Event, seq: int = 0) -> Consent:
    if not isinstance(event, ConsentEvent):
        return consent
    if seq and seq <= consent.version:
        return consent  # already folded in (a reader that ran ahead sees it again)
    consent = replace(consent, domain=event.domain.lower(), version=max(consent.version, seq))
    match event:
        case DomainClaimed(token=token):
            return replace(
                consent,
                status=ConsentStatus.CLAIMED,
                token=token,
                expires_at=None,
                caps=event.caps or ConsentCaps(),
                wants_subdomains=event.include_subdomains,
                include_subdomains=False,
            )
        case ConsentGiven(expires_at=expires_at, caps=caps, ports=ports, evidence=evidence):
            return replace(
                consent,
                status=ConsentStatus.VERIFIED,
                expires_at=expires_at,
                caps=caps,
                ports=frozenset(ports) or consent_ports(evidence),
                method=event.method,
                evidence=evidence,
                verified_at=event.verified_at or event.at,
                checked_at=event.verified_at or event.at,
                include_subdomains=event.include_subdomains,
            )
        case ConsentVerificationFailed():
            # a failed re-check does not cancel an earlier, still valid verification
            if consent.status == ConsentStatus.VERIFIED:
                return replace(consent, checked_at=event.at)
            return replace(consent, status=ConsentStatus.FAILED)
        case ConsentRevoked():
            # include_subdomains stays: the revocation governs the subdomains it covered
            return replace(consent, status=ConsentStatus.REVOKED, token="", expires_at=None)
    return consent
