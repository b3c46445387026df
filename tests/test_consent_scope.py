"""Which consent governs a host, and what the dispatcher does with it: caps shared by a
domain and the subdomains it covers, subdomains only by DNS, expiry as revocation,
the flows-per-minute window sliding, the ceiling."""

from __future__ import annotations

import urllib.error
from datetime import timedelta
from email.message import Message

import pytest
from msgspec.structs import replace

from engine.consent.decider import (
    ClaimDomain,
    Meta,
    RecordVerification,
    caps_asked,
    decide,
    lowered_to,
    within_ceiling,
)
from engine.consent.finding import Finding, Found
from engine.consent.well_known import check_token
from engine.errors import Invalid
from schemas.consent_state import (
    Consent,
    ConsentStatus,
    consent_domains,
    evolve_consent,
    governing,
    lapse_reason,
)
from schemas.events import ConsentGiven, ConsentRevoked, DomainClaimed, decode_event
from schemas.values import ConsentCaps
from tests.test_dispatch_state import NOW, World, done

DNS = "dns:_trafficbuster.a.test"
URL = "https://a.test/.well-known/trafficbuster.txt"
CEILING = ConsentCaps(max_concurrent=5, max_flows_per_minute=50)


def given(domain: str, *, subdomains: bool = False, caps: ConsentCaps = ConsentCaps(),
          expires: timedelta = timedelta(days=1)) -> ConsentGiven:  # fmt: skip
    return ConsentGiven(
        id="c",
        at=NOW,
        actor="t",
        domain=domain,
        method="dns" if subdomains else "well-known",
        evidence=DNS if subdomains else f"https://{domain}/.well-known/trafficbuster.txt",
        expires_at=NOW + expires,
        caps=caps,
        include_subdomains=subdomains,
    )


def revoked(domain: str) -> ConsentRevoked:
    return ConsentRevoked(id="r", at=NOW, actor="t", domain=domain, reason="token removed")


def fold(*events: ConsentGiven | ConsentRevoked | DomainClaimed) -> dict[str, Consent]:
    consents: dict[str, Consent] = {}
    for seq, event in enumerate(events, start=1):
        old = consents.get(event.domain, Consent(domain=event.domain))
        consents[event.domain] = evolve_consent(old, event, seq)
    return consents


def test_consent_domains_are_the_host_then_its_parents_never_a_top_level_or_an_ip() -> None:
    assert consent_domains("Shop.EU.a.test.") == ["shop.eu.a.test", "eu.a.test", "a.test"]
    assert consent_domains("127.0.0.1") == ["127.0.0.1"]
    assert consent_domains("localhost") == ["localhost"]


def test_a_parent_governs_a_subdomain_only_when_it_covers_subdomains() -> None:
    covered = fold(given("a.test", subdomains=True))
    assert governing(covered, "shop.a.test") == covered["a.test"]
    assert governing(fold(given("a.test")), "shop.a.test") is None


def test_a_subdomains_own_verified_or_revoked_consent_wins_over_its_parent() -> None:
    consents = fold(given("a.test", subdomains=True), given("shop.a.test"), revoked("shop.a.test"))
    own = governing(consents, "shop.a.test")
    assert own is not None and own.domain == "shop.a.test" and not own.valid_at(NOW)
    assert lapse_reason(own, "shop.a.test") == "consent revoked for shop.a.test"


def test_a_revoked_parent_that_covered_subdomains_revokes_them() -> None:
    consent = governing(fold(given("a.test", subdomains=True), revoked("a.test")), "x.a.test")
    assert consent is not None and consent.status == ConsentStatus.REVOKED


def test_subdomains_are_granted_only_to_a_claim_that_asked_and_a_dns_verification() -> None:
    meta = Meta(id="e", at=NOW, actor="t")
    for asked, method, granted in [
        (True, "dns", True),
        (True, "well-known", False),
        (False, "dns", False),
    ]:
        consent = Consent(domain="a.test")
        for cmd in (
            ClaimDomain("a.test", "t1", include_subdomains=asked),
            RecordVerification("a.test", "t1", DNS, method=method),  # type: ignore[arg-type]
        ):
            for event in decide(consent, cmd, meta):
                consent = evolve_consent(consent, event, consent.version + 1)
        assert consent.include_subdomains is granted, (asked, method)
        assert consent.method == method and consent.verified_at == NOW


def test_caps_above_the_ceiling_are_refused_naming_the_cap_and_the_ceiling() -> None:
    with pytest.raises(Invalid) as refused:
        within_ceiling(ConsentCaps(max_concurrent=6), CEILING)
    assert refused.value.field == "caps.max_concurrent"
    assert "at most 5" in refused.value.rule and "TB_CONSENT_MAX_SESSIONS" in refused.value.rule
    with pytest.raises(Invalid) as refused:
        decide(
            Consent(domain="a.test"),
            ClaimDomain("a.test", "t", replace(CEILING, max_flows_per_minute=51), ceiling=CEILING),
            Meta(id="e", at=NOW, actor="t"),
        )
    assert refused.value.field == "caps.max_flows_per_minute"
    # the defaults are lowered to the ceiling, not refused; a cap asked for is checked
    assert lowered_to(ConsentCaps(), CEILING) == CEILING
    assert caps_asked({"max_concurrent": 2, "max_flows_per_minute": None}, CEILING) == replace(
        CEILING, max_concurrent=2
    )
    with pytest.raises(Invalid, match="max_flows_per_minute"):
        caps_asked({"max_concurrent": None, "max_flows_per_minute": 51}, CEILING)


def test_caps_of_a_domain_hold_across_jobs_on_the_subdomains_it_covers() -> None:
    w = World()
    w.add(given("a.test", subdomains=True, caps=ConsentCaps(max_concurrent=2)))
    w.job("j1", flows=4, instance_count=4, url="http://shop.a.test/")
    w.job("j2", flows=4, instance_count=4, url="http://blog.a.test/")
    assert w.state.authorised_hosts(NOW) >= {"shop.a.test", "blog.a.test"}
    first = w.dispatch_all()
    assert len(first) == 2
    w.add(done(first[0]))
    assert len(w.dispatch_all()) == 1


def test_a_subdomain_without_a_covering_consent_is_not_authorised() -> None:
    w = World()
    w.add(given("a.test"))  # by HTTP: the web server, not the zone
    w.job("j1", flows=2, instance_count=2, url="http://shop.a.test/")
    assert "shop.a.test" not in w.state.authorised_hosts(NOW)
    assert w.dispatch_all() == []


def test_the_flows_per_minute_window_slides() -> None:
    w = World()
    w.add(given("a.test", caps=ConsentCaps(max_concurrent=100, max_flows_per_minute=3)))
    w.job("j1", flows=10, instance_count=10)
    first = w.dispatch_all()
    assert len(first) == 3
    for d in first:
        w.add(done(d))
    assert w.dispatch_all(NOW + timedelta(seconds=59)) == []
    assert len(w.dispatch_all(NOW + timedelta(seconds=61))) == 3


def test_an_expired_consent_is_treated_as_revoked() -> None:
    w = World()
    w.add(given("a.test", expires=timedelta(minutes=5)))
    w.job("j1", flows=4, instance_count=2)
    flying = w.dispatch_all()
    assert len(flying) == 2
    assert w.state.revoked_hosts(NOW) == frozenset()
    later = NOW + timedelta(minutes=6)
    assert w.state.revoked_hosts(later) == {"a.test"}
    actions = w.state.due(later)
    kinds = sorted(type(a).__name__ for a in actions)
    assert kinds == ["FailRevoked", "FailRevoked", "PauseRevoked"]
    assert w.state.dispatches(later) == []
    consent = w.state.consent_of("a.test")
    assert consent is not None and lapse_reason(consent, "a.test") == "consent expired for a.test"


def test_a_consent_given_recorded_before_verified_at_reads_its_time_as_verified_at() -> None:
    raw = (
        b'{"type":"ConsentGiven","id":"c","at":"2026-01-01T00:00:00Z","actor":"t",'
        b'"domain":"a.test","evidence":"https://a.test/.well-known/trafficbuster.txt",'
        b'"expires_at":"2026-02-01T00:00:00Z"}'
    )
    event = decode_event(raw)
    assert isinstance(event, ConsentGiven)
    assert (event.verified_at, event.include_subdomains, event.method) == (
        None,
        False,
        "well-known",
    )
    consent = evolve_consent(Consent(domain="a.test"), event, 1)
    assert consent.verified_at == event.at == consent.checked_at
    claimed = decode_event(
        b'{"type":"DomainClaimed","id":"d","at":"2026-01-01T00:00:00Z","actor":"t",'
        b'"domain":"a.test","token":"t1"}'
    )
    assert isinstance(claimed, DomainClaimed)
    assert (claimed.caps, claimed.include_subdomains) == (None, False)


@pytest.mark.parametrize(
    ("code", "found"),
    [(404, Found.ABSENT), (403, Found.ABSENT), (429, Found.UNREACHABLE), (503, Found.UNREACHABLE)],
)
async def test_what_a_well_known_answer_says_of_the_token(code: int, found: Found) -> None:
    async def answer(url: str) -> str:
        raise urllib.error.HTTPError(url, code, "", Message(), None)

    finding = await check_token(answer, URL, "t1")
    assert finding.found is found and f"HTTP {code}" in finding.reason


async def test_a_well_known_file_with_other_content_is_an_absent_token() -> None:
    async def other(url: str) -> str:
        return "t0"

    async def same(url: str) -> str:
        return "t1"

    assert (await check_token(other, URL, "t1")).found is Found.ABSENT
    assert (await check_token(same, URL, "t1")) == Finding(Found.SERVED, URL)


def test_a_parent_verified_again_without_its_subdomains_stops_their_flows() -> None:
    w = World()
    w.add(given("a.test", subdomains=True))
    w.job("j1", flows=4, instance_count=2, url="http://shop.a.test/")
    assert len(w.dispatch_all()) == 2
    assert w.state.due(NOW) == []
    w.add(given("a.test"))  # renewed over HTTP: the zone is no longer proven
    kinds = sorted(type(a).__name__ for a in w.state.due(NOW))
    assert kinds == ["FailRevoked", "FailRevoked", "PauseRevoked"]
    assert lapse_reason(w.state.consent_of("shop.a.test"), "shop.a.test") == (
        "no valid consent for shop.a.test"
    )
