"""Consent by DNS TXT record, re-verification and the ceiling, on a real nats-server with
a DNS server and web sites on loopback."""

from __future__ import annotations

import asyncio
import urllib.error
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from email.message import Message
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from engine.bus import Bus
from engine.consent.decider import CONSENT_VALIDITY
from engine.consent.dns_txt import TxtLookup
from engine.consent.finding import Found
from engine.consent.recheck import ConsentRecheck
from engine.consent.service import ConsentCommands, ConsentPolicy, VerificationFailed
from schemas import subjects
from schemas.consent_state import ConsentStatus
from schemas.events import ConsentGiven, ConsentRevoked, ConsentVerificationFailed
from schemas.values import ConsentCaps
from tests.api_client import api_config, log_in
from tests.conftest import NatsServer
from tests.dns_server import DnsServer, dns_server
from tests.sites import recording_site

ZONE = "shop.test"
RECORD = f"_trafficbuster.{ZONE}"
CEILING = ConsentCaps(max_concurrent=4, max_flows_per_minute=100)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with dns_server() as server:
        yield server


def commands(bus: Bus, dns: DnsServer, **policy: object) -> ConsentCommands:
    return ConsentCommands(
        bus,
        policy=ConsentPolicy(dns=TxtLookup(dns.address, timeout=2), **policy),  # type: ignore[arg-type]
    )


async def stored(bus: Bus, domain: str = ZONE) -> list[object]:
    return [env.event for env in await bus.load(subjects.consent_stream_filter(domain))]


async def test_dns_verification_reads_the_txt_record_and_may_cover_subdomains(
    bus: Bus, dns: DnsServer
) -> None:
    consents = commands(bus, dns)
    token, _ = await consents.claim(ZONE, "owner", include_subdomains=True)
    with pytest.raises(VerificationFailed) as missing:
        await consents.verify(ZONE, None, "owner", method="dns")
    assert f"{RECORD} has no TXT record" in missing.value.rule
    dns.records[RECORD] = ["v=something-else", token]
    given, _ = await consents.verify(ZONE, None, "owner", method="dns")
    assert (given.method, given.evidence) == ("dns", f"dns:{RECORD}")
    assert given.include_subdomains and given.verified_at == given.at
    assert RECORD in dns.questions


async def test_subdomains_are_not_covered_when_verified_over_http(bus: Bus, dns: DnsServer) -> None:
    consents = commands(bus, dns)
    token, _ = await consents.claim("127.0.0.1", "owner", include_subdomains=True)
    with recording_site(token=token) as site:
        given, _ = await consents.verify("127.0.0.1", site.base_url, "owner")
    assert given.method == "well-known" and not given.include_subdomains


async def test_recheck_renews_a_served_token_and_revokes_a_removed_one_once(
    bus: Bus, dns: DnsServer
) -> None:
    consents = commands(bus, dns)
    token, _ = await consents.claim(ZONE, "owner")
    dns.records[RECORD] = [token]
    first, _ = await consents.verify(ZONE, None, "owner", method="dns")
    fresh = await consents.recheck(ZONE)  # most of its validity left: nothing to record
    assert (fresh.found, fresh.status, fresh.appended.seq) == (
        Found.SERVED,
        ConsentStatus.VERIFIED,
        (await consents.load(ZONE)).version,
    )
    later = first.at + CONSENT_VALIDITY / 2
    consents.clock = lambda: later  # half its validity spent: renewed
    renewed = await consents.recheck(ZONE)
    assert (renewed.found, renewed.status) == (Found.SERVED, ConsentStatus.VERIFIED)
    del dns.records[RECORD]
    removed = await consents.recheck(ZONE)
    assert (removed.found, removed.status, removed.reason) == (
        Found.ABSENT,
        ConsentStatus.REVOKED,
        "token removed",
    )
    events = await stored(bus)
    assert [type(e).__name__ for e in events] == [
        "DomainClaimed",
        "ConsentGiven",
        "ConsentGiven",
        "ConsentRevoked",
    ]
    renewal = events[2]
    assert isinstance(renewal, ConsentGiven) and renewal.expires_at > first.expires_at
    revoked = events[3]
    assert isinstance(revoked, ConsentRevoked) and revoked.actor == "system"


async def test_engines_rechecking_one_consent_at_once_store_one_outcome(bus: Bus) -> None:
    setup = ConsentCommands(bus)
    token, _ = await setup.claim("127.0.0.1", "owner")
    with recording_site(token=token) as site:
        await setup.verify("127.0.0.1", site.base_url, "owner")
    both_looked = asyncio.Barrier(2)

    async def token_gone(url: str) -> str:
        await both_looked.wait()  # both engines read the consent before either appends
        raise urllib.error.HTTPError(url, 404, "Not Found", Message(), None)

    engines = [ConsentCommands(bus, fetch=token_gone) for _ in range(2)]
    results = await asyncio.gather(*(e.recheck("127.0.0.1") for e in engines))
    assert {(r.status, r.reason, r.appended.seq) for r in results} == {
        (ConsentStatus.REVOKED, "token removed", results[0].appended.seq)
    }
    kinds = [type(e).__name__ for e in await stored(bus, "127.0.0.1")]
    assert kinds == ["DomainClaimed", "ConsentGiven", "ConsentRevoked"]


async def test_a_recheck_that_cannot_reach_the_site_leaves_the_consent_until_expiry(
    bus: Bus, dns: DnsServer
) -> None:
    consents = commands(bus, dns)
    token, _ = await consents.claim("127.0.0.1", "owner")
    with recording_site(token=token) as site:
        await consents.verify("127.0.0.1", site.base_url, "owner")
    # the site is gone: nothing answers on its port
    result = await consents.recheck("127.0.0.1")
    assert (result.found, result.status) == (Found.UNREACHABLE, ConsentStatus.VERIFIED)
    assert isinstance((await stored(bus, "127.0.0.1"))[-1], ConsentVerificationFailed)


async def test_the_periodic_round_rechecks_only_what_is_due(bus: Bus, dns: DnsServer) -> None:
    consents = commands(bus, dns, recheck_every=timedelta(hours=1))
    async with asyncio.timeout(5):
        assert await ConsentRecheck(consents).round() == []  # nothing claimed yet
    token, _ = await consents.claim(ZONE, "owner")
    dns.records[RECORD] = [token]
    given, _ = await consents.verify(ZONE, None, "owner", method="dns")
    now = given.at
    rounds = ConsentRecheck(consents, clock=lambda: now)
    assert await rounds.round() == []  # verified just now
    now = given.at + timedelta(hours=1)
    served = await rounds.round()  # still served, far from expiry: nothing recorded
    assert [(r.found, r.status) for r in served] == [(Found.SERVED, ConsentStatus.VERIFIED)]
    assert len(await stored(bus)) == 2
    del dns.records[RECORD]
    now = given.at + timedelta(hours=1, minutes=59)
    assert await rounds.round() == []  # looked at an hour ago
    now = given.at + timedelta(hours=2)
    found = await rounds.round()
    assert [(r.domain, r.reason) for r in found] == [(ZONE, "token removed")]
    assert await rounds.round() == []  # revoked: nothing more to recheck


async def test_an_expired_consent_is_not_valid(bus: Bus, dns: DnsServer) -> None:
    consents = commands(bus, dns, validity=timedelta(milliseconds=200))
    token, _ = await consents.claim(ZONE, "owner")
    dns.records[RECORD] = [token]
    given, _ = await consents.verify(ZONE, None, "owner", method="dns")
    consent = await consents.load(ZONE)
    assert consent.valid_at(given.at)
    later = given.at + timedelta(seconds=1)
    assert not consent.valid_at(later)


# -- through HTTP -------------------------------------------------------------------


@pytest.fixture
async def api(
    nats_server: NatsServer, tmp_path: Path, dns: DnsServer
) -> AsyncIterator[AsyncTestClient]:
    policy = ConsentPolicy(ceiling=CEILING, dns=TxtLookup(dns.address, timeout=2))
    config = api_config(nats_server, tmp_path, consent=policy)
    async with AsyncTestClient(app=create_app(config)) as client:
        await log_in(client)
        yield client


async def test_caps_above_the_ceiling_are_a_400_naming_the_cap_and_the_ceiling(
    api: AsyncTestClient,
) -> None:
    r = await api.post(
        "/api/v1/consents", json={"domain": ZONE, "caps": {"max_flows_per_minute": 101}}
    )
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == "caps.max_flows_per_minute"
    assert "at most 100" in body["rule"] and "TB_CONSENT_MAX_FLOWS_PER_MINUTE" in body["rule"]
    r = await api.post("/api/v1/consents", json={"domain": ZONE, "caps": {"max_concurrent": 2}})
    assert r.status_code == 201, r.text
    assert r.json()["dns_record"] == RECORD


async def test_claim_verify_by_dns_and_recheck_through_http(
    api: AsyncTestClient, dns: DnsServer
) -> None:
    r = await api.post(
        "/api/v1/consents",
        json={"domain": ZONE, "caps": {"max_concurrent": 2}, "include_subdomains": True},
    )
    assert r.status_code == 201, r.text
    dns.records[RECORD] = [r.json()["token"]]
    r = await api.post(f"/api/v1/consents/{ZONE}/verify", json={"method": "dns"})
    assert r.status_code == 200, r.text
    verified = r.json()
    assert verified["method"] == "dns" and verified["include_subdomains"] is True
    # a cap left out is its default lowered to the ceiling
    assert verified["caps"] == {"max_concurrent": 2, "max_flows_per_minute": 100}
    # renewing with one cap changes that one and keeps the other
    r = await api.post(
        f"/api/v1/consents/{ZONE}/verify",
        json={"method": "dns", "caps": {"max_flows_per_minute": 50}},
    )
    assert r.json()["caps"] == {"max_concurrent": 2, "max_flows_per_minute": 50}, r.text
    r = await api.post(
        f"/api/v1/consents/{ZONE}/verify", json={"method": "dns", "base_url": "http://x"}
    )
    assert r.status_code == 400 and r.json()["field"] == "base_url"
    dns.records[RECORD] = []
    r = await api.post(f"/api/v1/consents/{ZONE}/recheck")
    assert r.status_code == 200, r.text
    assert (r.json()["found"], r.json()["status"], r.json()["reason"]) == (
        "absent",
        "revoked",
        "token removed",
    )
    await api.get(f"/api/v1/jobs?min_seq={r.json()['seq']}")
    (view,) = [c for c in (await api.get("/api/v1/consents")).json() if c["domain"] == ZONE]
    assert (view["status"], view["reason"]) == ("revoked", "token removed")
    r = await api.post("/api/v1/consents/nobody.test/recheck")
    assert r.status_code == 404 and r.json()["field"] == "domain"
