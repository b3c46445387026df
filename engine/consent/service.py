"""Consent commands at the edge: load the domain's consent, decide, append at the version read.

Every command carries an id (the caller's ``Idempotency-Key``, or one minted once per
request): a retry of it answers what the log holds from its first run. A verification
is appended expecting the consent not to have moved since it was read, before its token
was fetched: a revocation in between makes it a conflict (and the retry then finds the
consent revoked), never a resurrection.

Re-verification (``recheck``) looks for the token where the consent was last verified:
served renews the expiry once half of its validity is spent (so a consent checked every
hour adds an event a fortnight, not every hour), absent revokes the consent ("token
removed"), unreachable is a failed check that leaves the consent as it is until its
expiry. Its command id is the
domain and the version it read, so engines that recheck the same consent at once store
one outcome between them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import msgspec

from engine.bus import Appended, Bus, ConcurrencyConflict, Expect, retry_on_conflict
from engine.consent.decider import (
    CONSENT_VALIDITY,
    TOKEN_REMOVED,
    ClaimDomain,
    Meta,
    RecordVerification,
    RevokeConsent,
    decide,
    ensure_verifiable,
)
from engine.consent.dns_txt import TxtLookup, check_dns_token
from engine.consent.finding import Finding, Found
from engine.consent.well_known import (
    TokenFetcher,
    check_token,
    fetch_token_async,
    well_known_url,
)
from engine.errors import CommandIdReused, Conflict, Invalid, NotFound, Rejected
from schemas import subjects
from schemas.consent_state import Consent, ConsentStatus, evolve_consent
from schemas.events import (
    ConsentEvent,
    ConsentEvents,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Envelope,
)
from schemas.ids import new_id, utcnow
from schemas.values import ConsentCaps, Domain

__all__ = [
    "ConsentCommands",
    "ConsentPolicy",
    "Method",
    "Recheck",
    "VerificationFailed",
    "mint_token",
    "well_known_url",
]

Method = Literal["well-known", "dns"]

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


@dataclass(frozen=True)
class ConsentPolicy:
    """The server's consent settings: ``ceiling`` bounds the caps a claimant sets (None:
    only the caps' own bounds); ``validity``: how long a verification lasts; ``dns``:
    where TXT records are read; ``recheck_every``: how often re-verification runs."""

    ceiling: ConsentCaps | None = None
    validity: timedelta = CONSENT_VALIDITY
    dns: TxtLookup = field(default_factory=TxtLookup)
    recheck_every: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class Recheck:
    """What re-verifying a consent found, and what the log holds for it now."""

    domain: str
    found: Found
    status: ConsentStatus
    reason: str
    appended: Appended


@dataclass
class ConsentCommands:
    bus: Bus
    fetch: TokenFetcher = fetch_token_async
    clock: Callable[[], datetime] = utcnow
    new_token: Callable[[], str] = mint_token
    policy: ConsentPolicy = field(default_factory=ConsentPolicy)

    async def load(self, domain: str) -> Consent:
        return (await self._history(checked_domain(domain), None))[0]

    async def claim(
        self,
        domain: str,
        actor: str,
        command_id: str | None = None,
        *,
        caps: ConsentCaps | None = None,
        include_subdomains: bool = False,
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
            cmd = ClaimDomain(
                domain, self.new_token(), caps, include_subdomains, self.policy.ceiling
            )
            events = decide(consent, cmd, self._meta(actor))
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
        method: Method = "well-known",
    ) -> tuple[ConsentGiven, Appended]:
        """Look for the consent's token (at the well-known URL, or in the DNS TXT record)
        and record the outcome; on a verified domain this renews the expiry.
        ``VerificationFailed`` when the token is not served."""
        domain = checked_domain(domain)
        command = command_id or new_id()
        if method == "dns" and base_url is not None:
            raise Invalid("base_url", "is for method well-known only; DNS has no URL")
        url = well_known_url(domain, base_url) if method == "well-known" else ""

        async def attempt() -> tuple[ConsentGiven, Appended]:
            consent, stored = await self._history(domain, command)
            if not stored:
                ensure_verifiable(consent, domain)  # nothing is fetched for a lost cause
                finding = await self._look(domain, method, url, consent.token)
                events = decide(
                    consent, self._verification(consent, finding, method, caps), self._meta(actor)
                )
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

    async def recheck(self, domain: str, actor: str = "system") -> Recheck:
        """Look for a verified consent's token where it was verified, and record what that
        found: renewed, revoked ("token removed"), or a failed check."""
        domain = checked_domain(domain)

        async def attempt() -> Recheck:
            consent = await self.load(domain)
            if consent.status == ConsentStatus.NONE:
                raise NotFound("domain", f"{domain} has not been claimed")
            if consent.status != ConsentStatus.VERIFIED:
                status = consent.status.value
                raise Conflict("domain", f"{domain} is {status}: only a verified one is rechecked")
            # the command is this consent at this version: engines rechecking it at once
            # store one outcome (the others find it in the log under this id)
            command = f"recheck-{domain}-{consent.version}"
            method: Method = "dns" if consent.method == "dns" else "well-known"
            url = consent.evidence
            if not url.startswith(("http://", "https://")):  # recorded without its URL
                url = well_known_url(domain, None)
            finding = await self._look(domain, method, url, consent.token)
            if finding.found is Found.SERVED and not self._renewal_due(consent):
                unchanged = Appended(seq=consent.version, duplicate=True)
                return Recheck(domain, finding.found, consent.status, "", unchanged)
            meta = self._meta(actor)
            if finding.found is Found.ABSENT:
                events = decide(consent, RevokeConsent(domain, TOKEN_REMOVED), meta)
            else:
                events = decide(consent, self._verification(consent, finding, method), meta)
            try:
                stored = await self._append(consent, events, command)
            except ConcurrencyConflict:
                # another engine rechecked this very version first: its outcome stands
                # (the server checks the expected sequence before the msg-id)
                stored = (await self._history(domain, command))[1]
                if not stored:
                    raise
            after = consent
            for env in stored:
                after = evolve_consent(after, env.event, env.seq)
            event = stored[-1].event
            reason = event.reason if isinstance(event, ConsentRevoked) else finding.reason
            return Recheck(domain, finding.found, after.status, reason, _appended(stored))

        return await retry_on_conflict(attempt)

    def _renewal_due(self, consent: Consent) -> bool:
        left = consent.expires_at - self.clock() if consent.expires_at else timedelta(0)
        return left <= self.policy.validity / 2

    async def _look(self, domain: str, method: Method, url: str, token: str) -> Finding:
        if method == "dns":
            return await check_dns_token(self.policy.dns, domain, token)
        return await check_token(self.fetch, url, token)

    def _verification(
        self,
        consent: Consent,
        finding: Finding,
        method: Method,
        caps: ConsentCaps | None = None,
    ) -> RecordVerification:
        return RecordVerification(
            consent.domain,
            consent.token,
            finding.evidence,
            finding.failure,
            caps,
            self.policy.validity,
            method,
            self.policy.ceiling,
        )

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
