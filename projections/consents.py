"""Read model of domain consent: claimed, verified (with caps and expiry), failed, revoked."""

from __future__ import annotations

import aiosqlite

from projections.db import iso
from schemas.consent_state import Consent, ConsentStatus, evolve_consent
from schemas.events import (
    ConsentEvent,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Envelope,
)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS consents (
        domain TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        token TEXT,
        method TEXT,
        evidence TEXT,
        verified_at TEXT,
        expires_at TEXT,
        max_concurrent INTEGER,
        max_flows_per_minute INTEGER,
        include_subdomains INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
)

_UPSERT = (
    "INSERT INTO consents (domain, status, updated_at, last_seq, {cols})"
    " VALUES (?, ?, ?, ?, {marks})"
    " ON CONFLICT (domain) DO UPDATE SET status = excluded.status,"
    " updated_at = excluded.updated_at, last_seq = excluded.last_seq, {sets}"
)


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one consent event; returns the domains that changed. The status is the one
    rule every reader of consent shares (``schemas.consent_state``): a failed re-check
    leaves a verified domain verified, a revocation retires the token."""
    event = env.event
    if not isinstance(event, ConsentEvent):
        return set()
    status = evolve_consent(await _current(db, event.domain), event).status
    match event:
        case DomainClaimed():
            # a new claim starts over: the old evidence proved a different token
            caps = event.caps
            await _upsert(
                db, env, event.domain, status,
                token=event.token, method=None, evidence=None, verified_at=None,
                expires_at=None, reason=None, include_subdomains=int(event.include_subdomains),
                max_concurrent=caps.max_concurrent if caps else None,
                max_flows_per_minute=caps.max_flows_per_minute if caps else None,
            )  # fmt: skip
        case ConsentGiven():
            await _upsert(
                db, env, event.domain, status,
                method=event.method, evidence=event.evidence, expires_at=iso(event.expires_at),
                verified_at=iso(event.verified_at or event.at),
                max_concurrent=event.caps.max_concurrent,
                max_flows_per_minute=event.caps.max_flows_per_minute, reason=None,
                include_subdomains=int(event.include_subdomains),
            )  # fmt: skip
        case ConsentVerificationFailed():
            await _upsert(db, env, event.domain, status, reason=event.reason or None)
        case ConsentRevoked():
            await _upsert(
                db, env, event.domain, status,
                token=None, expires_at=None, reason=event.reason or None,
            )  # fmt: skip
    return {domain_key(event.domain)}


async def _current(db: aiosqlite.Connection, domain: str) -> Consent:
    rows = await db.execute_fetchall(
        "SELECT status, token FROM consents WHERE domain = ?", (domain_key(domain),)
    )
    for status, token in rows:
        return Consent(domain=domain, status=ConsentStatus(status), token=token or "")
    return Consent(domain=domain)


def domain_key(domain: str) -> str:
    return domain.lower().rstrip(".")


async def _upsert(
    db: aiosqlite.Connection,
    env: Envelope,
    domain: str,
    status: ConsentStatus,
    **columns: str | int | None,
) -> None:
    names = list(columns)
    sql = _UPSERT.format(
        cols=", ".join(names),
        marks=", ".join("?" for _ in names),
        sets=", ".join(f"{name} = excluded.{name}" for name in names),
    )
    await db.execute(
        sql, (domain_key(domain), status.value, iso(env.event.at), env.seq, *columns.values())
    )
