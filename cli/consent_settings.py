"""Consent settings read from the environment: the caps' ceiling, how long a verification
lasts, how often consents are re-verified, and which name server DNS checks ask."""

from __future__ import annotations

import os
from datetime import timedelta

from cli.settings import _float, _int
from engine.consent.decider import CEILING_SETTINGS, CONSENT_VALIDITY
from engine.consent.dns_txt import TxtLookup, parse_name_server
from engine.consent.service import ConsentPolicy
from engine.errors import Invalid
from schemas.values import ConsentCaps

DEFAULT_CEILING = ConsentCaps(max_concurrent=100, max_flows_per_minute=6000)
DEFAULT_RECHECK = timedelta(hours=1)


def consent_policy_from_env() -> ConsentPolicy:
    """TB_CONSENT_MAX_SESSIONS (default 100) and TB_CONSENT_MAX_FLOWS_PER_MINUTE (default
    6000): the most a claimant may set; TB_CONSENT_VALIDITY (s, default 30 days): how long
    a verification lasts; TB_CONSENT_RECHECK (s, default 3600): how often each verified
    consent is looked at again; TB_DNS_RESOLVER (``host`` or ``host:port``, default the
    system's): the name server DNS verification asks."""
    bounds = {"max_concurrent": 10_000, "max_flows_per_minute": 1_000_000}
    ceiling: dict[str, int] = {}
    for cap, setting in CEILING_SETTINGS.items():
        value = _int(setting, getattr(DEFAULT_CEILING, cap))
        if value > bounds[cap]:
            raise SystemExit(f"{setting}: must be at most {bounds[cap]} (got {value})")
        ceiling[cap] = value
    raw = os.environ.get("TB_DNS_RESOLVER", "").strip()
    try:
        server = parse_name_server(raw) if raw else None
    except Invalid as err:
        raise SystemExit(f"TB_DNS_RESOLVER: {err.rule} (got {raw!r})") from None
    return ConsentPolicy(
        ceiling=ConsentCaps(**ceiling),
        validity=timedelta(seconds=_float("TB_CONSENT_VALIDITY", CONSENT_VALIDITY.total_seconds())),
        dns=TxtLookup(server),
        recheck_every=timedelta(
            seconds=_float("TB_CONSENT_RECHECK", DEFAULT_RECHECK.total_seconds())
        ),
    )
