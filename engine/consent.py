"""Consent = verified control of a domain (DESIGN §8).

The owner serves the claim token at ``/.well-known/trafficbuster.txt``; a match
records ``ConsentGiven`` with its evidence, expiry and caps.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from engine.bus import Appended, Bus, Expect, retry_on_conflict
from engine.errors import Invalid, NotFound, Rejected
from engine.ids import new_id, utcnow
from schemas import VERSION, subjects
from schemas.events import (
    ConsentEvent,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Event,
)
from schemas.values import ConsentCaps

WELL_KNOWN_PATH = "/.well-known/trafficbuster.txt"
CONSENT_VALIDITY = timedelta(days=30)
MAX_TOKEN_BYTES = 4096


@dataclass(frozen=True)
class Consent:
    domain: str = ""
    status: str = "none"  # none | claimed | verified | failed | revoked
    token: str = ""
    expires_at: datetime | None = None
    caps: ConsentCaps = ConsentCaps()
    version: int = 0

    def valid_at(self, now: datetime) -> bool:
        return self.status == "verified" and self.expires_at is not None and self.expires_at > now


def evolve_consent(consent: Consent, event: Event, seq: int = 0) -> Consent:
    if not isinstance(event, ConsentEvent):
        return consent
    consent = replace(consent, domain=event.domain, version=max(consent.version, seq))
    match event:
        case DomainClaimed(token=token):
            return replace(consent, status="claimed", token=token, expires_at=None)
        case ConsentGiven(expires_at=expires_at, caps=caps):
            return replace(consent, status="verified", expires_at=expires_at, caps=caps)
        case ConsentVerificationFailed():
            # a failed re-check does not cancel an earlier, still valid verification
            return consent if consent.status == "verified" else replace(consent, status="failed")
        case ConsentRevoked():
            return replace(consent, status="revoked", expires_at=None)
    return consent


def well_known_url(domain: str, base_url: str | None) -> str:
    """Where the token must be served; ``base_url`` may add a scheme and port, not another host."""
    if base_url is None:
        return f"https://{domain}{WELL_KNOWN_PATH}"
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("base_url", "must be an http(s) URL such as https://example.com")
    if parts.hostname.lower() != domain:
        raise Rejected("base_url", f"host must be the claimed domain {domain}")
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN_PATH}"


class VerificationFailed(Rejected):
    def __init__(self, domain: str, reason: str) -> None:
        super().__init__("domain", f"{domain} not verified: {reason}")
        self.reason = reason


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the token must be served by the domain itself, not found elsewhere


def fetch_token(url: str, timeout: float = 5.0) -> str:
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(
        url, headers={"User-Agent": f"TrafficBuster/{VERSION} consent-check"}
    )
    with opener.open(request, timeout=timeout) as response:
        return bytes(response.read(MAX_TOKEN_BYTES)).decode("utf-8", "replace").strip()


TokenFetcher = Callable[[str], Awaitable[str]]


async def fetch_token_async(url: str) -> str:
    return await asyncio.to_thread(fetch_token, url)


@dataclass
class ConsentCommands:
    bus: Bus
    fetch: TokenFetcher = fetch_token_async
    clock: Callable[[], datetime] = utcnow

    async def load(self, domain: str) -> Consent:
        consent = Consent(domain=domain)
        for env in await self.bus.load(subjects.consent_stream_filter(domain)):
            consent = evolve_consent(consent, env.event, env.seq)
        return consent

    async def claim(self, domain: str, actor: str) -> tuple[str, Appended]:
        """A token to publish; claiming again returns the same token until it is verified."""
        domain = domain.lower()

        async def attempt() -> tuple[str, Appended]:
            consent = await self.load(domain)
            if consent.status in ("claimed", "failed") and consent.token:
                return consent.token, Appended(seq=consent.version, duplicate=True)
            token = f"tb-verify-{secrets.token_urlsafe(24)}"
            event = DomainClaimed(
                id=new_id(), at=self.clock(), actor=actor, domain=domain, token=token
            )
            return token, await self._append(consent, event)

        return await retry_on_conflict(attempt)

    async def verify(
        self, domain: str, base_url: str | None, actor: str, caps: ConsentCaps | None = None
    ) -> tuple[ConsentGiven, Appended]:
        domain = domain.lower()
        url = well_known_url(domain, base_url)
        consent = await self.load(domain)
        if consent.status == "none" or not consent.token:
            raise NotFound("domain", f"{domain} has not been claimed: POST /api/v1/consents first")
        now = self.clock()
        reason = await self._check(url, consent.token)
        if reason is not None:
            failed = ConsentVerificationFailed(
                id=new_id(), at=now, actor=actor, domain=domain, reason=reason
            )
            await retry_on_conflict(lambda: self._append_fresh(domain, failed))
            raise VerificationFailed(domain, reason)
        given = ConsentGiven(
            id=new_id(),
            at=now,
            actor=actor,
            domain=domain,
            evidence=url,
            expires_at=now + CONSENT_VALIDITY,
            caps=caps or consent.caps,
        )
        appended = await retry_on_conflict(lambda: self._append_fresh(domain, given))
        return given, appended

    async def revoke(self, domain: str, reason: str, actor: str) -> Appended:
        domain = domain.lower()
        event = ConsentRevoked(
            id=new_id(), at=self.clock(), actor=actor, domain=domain, reason=reason
        )
        return await retry_on_conflict(lambda: self._append_fresh(domain, event))

    async def _check(self, url: str, token: str) -> str | None:
        try:
            served = await self.fetch(url)
        except urllib.error.HTTPError as err:
            return f"{url} answered HTTP {err.code}"
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            return f"{url} could not be fetched ({getattr(err, 'reason', err)})"
        if served != token:
            return f"{url} does not serve the claimed token"
        return None

    async def _append_fresh(self, domain: str, event: ConsentEvent) -> Appended:
        return await self._append(await self.load(domain), event)

    async def _append(self, consent: Consent, event: ConsentEvent) -> Appended:
        scope = subjects.consent_stream_filter(event.domain)
        return await self.bus.append(
            event,
            msg_id=subjects.aggregate_msg_id(scope, consent.version, type(event).__name__),
            expect=Expect(scope, consent.version),
        )
