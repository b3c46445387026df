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
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from engine.bus import Appended, Bus, Expect, applied_by, retry_on_conflict
from engine.errors import Invalid, NotFound, Rejected
from schemas import VERSION, subjects
from schemas.consent_state import Consent, evolve_consent
from schemas.events import (
    ConsentEvent,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Envelope,
)
from schemas.ids import new_id, utcnow
from schemas.values import ConsentCaps

WELL_KNOWN_PATH = "/.well-known/trafficbuster.txt"
CONSENT_VALIDITY = timedelta(days=30)
MAX_TOKEN_BYTES = 4096


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
        return (await self._history(domain, None))[0]

    async def _history(
        self, domain: str, command_id: str | None
    ) -> tuple[Consent, Envelope | None]:
        """The consent, and the event ``command_id`` stored if that command ran before."""
        envelopes = await self.bus.load(subjects.consent_stream_filter(domain))
        consent = Consent(domain=domain)
        for env in envelopes:
            consent = evolve_consent(consent, env.event, env.seq)
        before = applied_by(envelopes, command_id) if command_id else None
        stored = next((e for e in envelopes if before and e.seq == before.seq), None)
        return consent, stored

    async def claim(
        self, domain: str, actor: str, command_id: str | None = None
    ) -> tuple[str, Appended]:
        """A token to publish; claiming again returns the same token until it is verified."""
        domain = domain.lower()
        command = command_id or new_id()  # one id for this command, kept across retries

        async def attempt() -> tuple[str, Appended]:
            consent, before = await self._history(domain, command)
            if before is not None and isinstance(before.event, DomainClaimed):
                return before.event.token, Appended(seq=before.seq, duplicate=True)
            if consent.status in ("claimed", "failed") and consent.token:
                return consent.token, Appended(seq=consent.version, duplicate=True)
            token = f"tb-verify-{secrets.token_urlsafe(24)}"
            event = DomainClaimed(
                id=new_id(), at=self.clock(), actor=actor, domain=domain, token=token
            )
            appended = await self._append(consent, event, command)
            if appended.duplicate:
                # this command was stored before (a retry): answer what the log holds
                stored = (await self._history(domain, command))[1]
                if stored is not None and isinstance(stored.event, DomainClaimed):
                    return stored.event.token, appended
            return token, appended

        return await retry_on_conflict(attempt)

    async def verify(
        self,
        domain: str,
        base_url: str | None,
        actor: str,
        caps: ConsentCaps | None = None,
        command_id: str | None = None,
    ) -> tuple[ConsentGiven, Appended]:
        domain = domain.lower()
        command = command_id or new_id()
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
            await retry_on_conflict(lambda: self._append_fresh(domain, failed, command))
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
        appended = await retry_on_conflict(lambda: self._append_fresh(domain, given, command))
        return given, appended

    async def revoke(
        self, domain: str, reason: str, actor: str, command_id: str | None = None
    ) -> Appended:
        domain = domain.lower()
        command = command_id or new_id()
        event = ConsentRevoked(
            id=new_id(), at=self.clock(), actor=actor, domain=domain, reason=reason
        )
        return await retry_on_conflict(lambda: self._append_fresh(domain, event, command))

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

    async def _append_fresh(self, domain: str, event: ConsentEvent, command: str) -> Appended:
        return await self._append(await self.load(domain), event, command)

    async def _append(self, consent: Consent, event: ConsentEvent, command: str) -> Appended:
        scope = subjects.consent_stream_filter(event.domain)
        return await self.bus.append(
            event,
            msg_id=subjects.command_msg_id(command),
            expect=Expect(scope, consent.version),
        )
