"""Consent commands at the edge: load the domain's consent, decide, append at the version read.

Every command carries an id (the caller's ``Idempotency-Key``, or one minted once per
request): a retry of it answers what the log holds from its first run. A verification
is appended expecting the consent not to have moved since it was read, before its token
was fetched: a revocation in between makes it a conflict (and the retry then finds the
consent revoked), never a resurrection.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import msgspec

from engine.bus import Appended, Bus, Expect, retry_on_conflict
from engine.consent.decider import (
    ClaimDomain,
    Meta,
    RecordVerification,
    RevokeConsent,
    decide,
    ensure_verifiable,
)
from engine.consent.well_known import (
    TokenFetcher,
    check_token,
    fetch_token_async,
    well_known_url,
)
from engine.errors import CommandIdReused, Invalid, Rejected
from schemas import subjects
from schemas.consent_state import Consent, evolve_consent
from schemas.events import (
    ConsentEvent,
    ConsentEvents,
    ConsentGiven,
    ConsentVerificationFailed,
    DomainClaimed,
    Envelope,
)
from schemas.ids import new_id, utcnow
from schemas.values import ConsentCaps, Domain

__all__ = ["ConsentCommands", "VerificationFailed", "mint_token", "well_known_url"]

E = TypeVar("E", bound=ConsentEvent)


class VerificationFailed(Rejected):
    def __init__(self, domain: str, reason: str) -> None:
        super().__init__("domain", f"{domain} not verified: {reason}")
        self.reason = reason


DOMAIN_RULE = "must be a host name such as example.com"


def checked_domain(domain: str) -> str:
    """The domain, lower-cased, if it is one; it becomes a subject token."""
    try:
        return msgspec.convert(domain, Domain).lower()
    except msgspec.ValidationError:
        raise Invalid("domain", DOMAIN_RULE) from None


def mint_token() -> str:
    return f"tb-verify-{secrets.token_urlsafe(24)}"


@dataclass
class ConsentCommands:
    bus: Bus
    fetch: TokenFetcher = fetch_token_async
    clock: Callable[[], datetime] = utcnow
    new_token: Callable[[], str] = mint_token

    async def load(self, domain: str) -> Consent:
        return (await self._history(checked_domain(domain), None))[0]

    async def claim(
        self, domain: str, actor: str, command_id: str | None = None
    ) -> tuple[str, Appended]:
        """The token to publish: a new one for a new (or revoked) domain, else the current one.

        A verified domain is a ``Conflict``: a claim never undoes a verification.
        """
        domain = checked_domain(domain)
        command = command_id or new_id()  # one id for this command, kept across retries

        async def attempt() -> tuple[str, Appended]:
            consent, stored = await self._history(domain, command)
            if stored:
                return _stored(stored, DomainClaimed).token, _appended(stored)
            events = decide(consent, ClaimDomain(domain, self.new_token()), self._meta(actor))
            if not events:  # claimed before: the published token stands
                return consent.token, Appended(seq=consent.version, duplicate=True)
            stored = await self._append(consent, events, command)
            return _stored(stored, DomainClaimed).token, _appended(stored)

        return await retry_on_conflict(attempt)

    async def verify(
        self,
        domain: str,
        base_url: str | None,
        actor: str,
        command_id: str | None = None,
        *,
        caps: ConsentCaps | None = None,
    ) -> tuple[ConsentGiven, Appended]:
        """Fetch the consent's token from the domain and record the outcome; on a verified
        domain this renews the expiry. ``VerificationFailed`` when the token is not served."""
        domain = checked_domain(domain)
        command = command_id or new_id()
        url = well_known_url(domain, base_url)

        async def attempt() -> tuple[ConsentGiven, Appended]:
            consent, stored = await self._history(domain, command)
            if not stored:
                ensure_verifiable(consent, domain)  # nothing is fetched for a lost cause
                failure = await check_token(self.fetch, url, consent.token)
                verification = RecordVerification(domain, consent.token, url, failure, caps)
                events = decide(consent, verification, self._meta(actor))
                stored = await self._append(consent, events, command)
            if isinstance(stored[-1].event, ConsentVerificationFailed):
                raise VerificationFailed(domain, stored[-1].event.reason)
            return _stored(stored, ConsentGiven), _appended(stored)

        return await retry_on_conflict(attempt)

    async def revoke(
        self, domain: str, reason: str, actor: str, command_id: str | None = None
    ) -> Appended:
        """Retire the domain's token: its consent no longer authorises anything."""
        domain = checked_domain(domain)
        command = command_id or new_id()

        async def attempt() -> Appended:
            consent, stored = await self._history(domain, command)
            if stored:
                return _appended(stored)
            events = decide(consent, RevokeConsent(domain, reason), self._meta(actor))
            return _appended(await self._append(consent, events, command))

        return await retry_on_conflict(attempt)

    def _meta(self, actor: str) -> Meta:
        return Meta(id=new_id(), at=self.clock(), actor=actor)

    async def _history(self, domain: str, command_id: str | None) -> tuple[Consent, list[Envelope]]:
        """The consent, and the events ``command_id`` stored if that command ran before."""
        envelopes = await self.bus.load(subjects.consent_stream_filter(domain))
        consent = Consent(domain=domain)
        for env in envelopes:
            consent = evolve_consent(consent, env.event, env.seq)
        prefix = subjects.command_msg_id(command_id, 0).removesuffix("0") if command_id else None
        stored = [env for env in envelopes if prefix and env.msg_id.startswith(prefix)]
        return consent, stored

    async def _append(
        self, consent: Consent, events: list[ConsentEvents], command: str
    ) -> list[Envelope]:
        """Append at the version ``consent`` was read at (``ConcurrencyConflict`` if it
        moved); returns what the log holds for this command."""
        scope = subjects.consent_stream_filter(consent.domain)
        expected = consent.version
        stored: list[Envelope] = []
        for n, event in enumerate(events):
            msg_id = subjects.command_msg_id(command, n)
            appended = await self.bus.append(event, msg_id=msg_id, expect=Expect(scope, expected))
            if appended.duplicate:
                # an earlier run of this very command stored it: answer what that stored
                before = (await self._history(consent.domain, command))[1]
                if not before:
                    raise CommandIdReused("on another domain")
                return before
            stored.append(Envelope(appended.seq, subjects.subject_for(event), event, msg_id))
            expected = appended.seq
        return stored


def _stored(stored: list[Envelope], kind: type[E]) -> E:
    event = stored[-1].event
    if not isinstance(event, kind):
        raise CommandIdReused(type(event).__name__)
    return event


def _appended(stored: list[Envelope]) -> Appended:
    return Appended(seq=stored[-1].seq, duplicate=True)
