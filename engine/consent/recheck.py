"""Periodic re-verification: every verified consent is looked at again once its last
check is ``every`` old; a token that is gone revokes it ("token removed"), which is the
revocation kill switch (flows on the host end, its jobs pause).

Safe to run in several engines at once: which consents are due is read from the log
(the time of their last check), and a recheck's msg-id is the consent's version, so
two engines rechecking one consent store one outcome. Each round reads only the
consent events stored since the last one (renewals add one an interval per domain).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import nats.errors
import structlog

from engine.bus import ConcurrencyConflict
from engine.consent.service import ConsentCommands, Recheck
from engine.errors import Rejected
from schemas import subjects
from schemas.consent_state import Consent, ConsentStatus, evolve_consent
from schemas.events import ConsentEvent
from schemas.ids import utcnow

log = structlog.get_logger("tb.consent")

LONGEST_NAP = 30.0  # seconds between looks at what is due, at most


def due(
    consent: Consent, now: datetime, every: timedelta, seen_served: datetime | None = None
) -> bool:
    """Whether ``consent`` is to be looked at again: verified, and its last check (in the
    log, or a served token this process saw without a renewal to record) is ``every`` old."""
    checks = [t for t in (consent.checked_at, consent.verified_at, seen_served) if t]
    return consent.status == ConsentStatus.VERIFIED and (not checks or max(checks) + every <= now)


@dataclass
class ConsentRecheck:
    commands: ConsentCommands
    clock: Callable[[], datetime] = utcnow
    consents: dict[str, Consent] = field(default_factory=dict)  # every domain's, folded
    position: int = 0  # the last stream sequence folded in
    served: dict[str, datetime] = field(default_factory=dict)  # token seen, nothing recorded

    @property
    def every(self) -> timedelta:
        return self.commands.policy.recheck_every

    async def run(self) -> None:
        nap = min(self.every.total_seconds() / 4, LONGEST_NAP)
        while True:
            await self.round()
            await asyncio.sleep(nap)

    async def round(self) -> list[Recheck]:
        """Recheck every consent that is due now; returns what each found."""
        await self._catch_up()
        now = self.clock()
        results: list[Recheck] = []
        for consent in list(self.consents.values()):
            if not due(consent, now, self.every, self.served.get(consent.domain)):
                continue
            try:
                result = await self.commands.recheck(consent.domain)
            except (Rejected, ConcurrencyConflict) as err:
                # it moved meanwhile (revoked, claimed again): the next round sees how it stands
                log.info("consent.recheck_skipped", domain=consent.domain, reason=str(err))
                continue
            except nats.errors.Error:
                raise  # NATS trouble: the supervisor restarts this with back-off
            results.append(result)
            self.served[result.domain] = now
            log.info(
                "consent.rechecked",
                domain=result.domain,
                found=result.found.value,
                status=result.status.value,
                reason=result.reason,
            )
        return results

    async def _catch_up(self) -> None:
        batches = self.commands.bus.read_batches(
            self.position + 1, subjects.all_consents(), follow=False
        )
        try:
            async for batch in batches:
                for env in batch.envelopes:
                    if isinstance(env.event, ConsentEvent):
                        domain = env.event.domain.lower()
                        old = self.consents.get(domain, Consent(domain=domain))
                        self.consents[domain] = evolve_consent(old, env.event, env.seq)
                self.position = max(self.position, batch.last_seq)
        finally:
            await batches.aclose()
