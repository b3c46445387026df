"""The consent decider: a claim never undoes a verification, a revoked token stays retired."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.consent.decider import (
    CONSENT_VALIDITY,
    ClaimDomain,
    ConsentCommand,
    Meta,
    RecordVerification,
    RevokeConsent,
    decide,
)
from engine.errors import Conflict, NotFound, Rejected
from schemas.consent_state import Consent, ConsentStatus, evolve_consent
from schemas.events import (
    ConsentEvents,
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
)
from schemas.values import ConsentCaps

D = "example.com"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
META = Meta(id="e", at=T0, actor="test")
URL = f"https://{D}/.well-known/trafficbuster.txt"


def fold(*cmds: ConsentCommand) -> tuple[Consent, list[ConsentEvents]]:
    consent, log = Consent(domain=D), []
    for seq, cmd in enumerate(cmds, start=1):
        for event in decide(consent, cmd, META):
            consent = evolve_consent(consent, event, seq)
            log.append(event)
    return consent, log


def verified(token: str = "t1") -> RecordVerification:
    return RecordVerification(D, token, URL)


def test_a_new_domain_is_claimed_with_the_fresh_token() -> None:
    consent, [event] = fold(ClaimDomain(D, "t1"))
    assert isinstance(event, DomainClaimed) and event.token == "t1"
    assert (consent.status, consent.token) == (ConsentStatus.CLAIMED, "t1")


@pytest.mark.parametrize("failure", [None, "not served"])
def test_claiming_a_claimed_or_failed_domain_keeps_its_token(failure: str | None) -> None:
    claimed, _ = fold(ClaimDomain(D, "t1"))
    if failure:
        claimed, _ = fold(ClaimDomain(D, "t1"), RecordVerification(D, "t1", URL, failure))
        assert claimed.status == ConsentStatus.FAILED
    assert decide(claimed, ClaimDomain(D, "t2"), META) == []


def test_claiming_a_verified_domain_is_a_conflict_naming_its_status() -> None:
    consent, _ = fold(ClaimDomain(D, "t1"), verified())
    with pytest.raises(Conflict) as refused:
        decide(consent, ClaimDomain(D, "t2"), META)
    assert refused.value.field == "domain"
    assert refused.value.rule == (
        "example.com is verified; revoke it first or verify again to renew"
    )


def test_verification_records_evidence_expiry_and_caps() -> None:
    caps = ConsentCaps(max_concurrent=3, max_flows_per_minute=60)
    consent, [_, given] = fold(ClaimDomain(D, "t1"), RecordVerification(D, "t1", URL, None, caps))
    assert isinstance(given, ConsentGiven)
    assert (given.evidence, given.expires_at, given.caps) == (URL, T0 + CONSENT_VALIDITY, caps)
    assert consent.valid_at(T0)


def test_verifying_a_verified_domain_renews_its_expiry_and_keeps_its_caps() -> None:
    caps = ConsentCaps(max_concurrent=3)
    consent, _ = fold(ClaimDomain(D, "t1"), RecordVerification(D, "t1", URL, None, caps))
    later = Meta(id="e2", at=T0 + timedelta(days=20), actor="test")
    [renewed] = decide(consent, verified(), later)
    assert isinstance(renewed, ConsentGiven)
    assert renewed.expires_at == later.at + CONSENT_VALIDITY and renewed.caps == caps


def test_a_failed_check_of_a_verified_domain_does_not_cancel_it() -> None:
    consent, log = fold(
        ClaimDomain(D, "t1"), verified(), RecordVerification(D, "t1", URL, "HTTP 500")
    )
    assert isinstance(log[-1], ConsentVerificationFailed)
    assert consent.status == ConsentStatus.VERIFIED


def test_verifying_an_unclaimed_domain_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide(Consent(domain=D), verified(), META)


def test_a_revoked_consent_cannot_be_verified_with_its_old_token() -> None:
    consent, log = fold(ClaimDomain(D, "t1"), verified(), RevokeConsent(D, "owner asked"))
    assert isinstance(log[-1], ConsentRevoked)
    assert (consent.status, consent.token) == (ConsentStatus.REVOKED, "")
    with pytest.raises(Conflict) as refused:
        decide(consent, verified("t1"), META)
    assert "claim it again" in refused.value.rule


def test_a_new_claim_after_revocation_mints_a_new_token() -> None:
    consent, _ = fold(ClaimDomain(D, "t1"), verified(), RevokeConsent(D), ClaimDomain(D, "t2"))
    assert (consent.status, consent.token) == (ConsentStatus.CLAIMED, "t2")
    with pytest.raises(Conflict):
        decide(consent, verified("t1"), META)  # the retired token proves nothing
    [given] = decide(consent, verified("t2"), META)
    assert isinstance(given, ConsentGiven)


def test_a_verification_of_a_token_that_is_no_longer_current_is_a_conflict() -> None:
    consent, _ = fold(ClaimDomain(D, "t1"), RevokeConsent(D), ClaimDomain(D, "t2"))
    with pytest.raises(Conflict):
        decide(consent, verified("t1"), META)


def test_revoking_an_unclaimed_domain_is_not_found_and_twice_is_a_conflict() -> None:
    with pytest.raises(NotFound):
        decide(Consent(domain=D), RevokeConsent(D), META)
    consent, _ = fold(ClaimDomain(D, "t1"), RevokeConsent(D))
    with pytest.raises(Conflict):
        decide(consent, RevokeConsent(D), META)


# -- as properties, over any sequence of commands ----------------------------------------

_fresh = itertools.count()
commands = st.lists(
    st.one_of(
        st.builds(lambda: ClaimDomain(D, f"t{next(_fresh)}")),
        st.builds(lambda: RevokeConsent(D, "r")),
        # a verification of some token (current or not), served or not
        st.tuples(st.integers(0, 3), st.sampled_from([None, "not served"])),
    ),
    max_size=30,
)


@given(commands)
def test_only_the_current_token_ever_verifies_and_claims_never_undo_it(
    steps: list[ClaimDomain | RevokeConsent | tuple[int, str | None]],
) -> None:
    consent = Consent(domain=D)
    tokens: list[str] = []  # every token claimed, oldest first
    retired: set[str] = set()
    for seq, step in enumerate(steps, start=1):
        if isinstance(step, tuple):
            back, failure = step
            token = tokens[-1 - back] if back < len(tokens) else "never-claimed"
            cmd: ConsentCommand = RecordVerification(D, token, URL, failure)
        else:
            cmd = step
        before = consent
        try:
            events = decide(before, cmd, META)
        except Rejected:
            continue
        for event in events:
            consent = evolve_consent(consent, event, seq)
            if isinstance(event, DomainClaimed):
                assert event.token not in tokens  # a claim never brings back a token
                tokens.append(event.token)
            if isinstance(event, ConsentRevoked):
                retired.add(before.token)
            if isinstance(event, ConsentGiven):
                # verified only with the current token, never a retired one
                assert isinstance(cmd, RecordVerification)
                assert cmd.token == before.token and cmd.token not in retired
        if isinstance(cmd, ClaimDomain):
            assert before.status != ConsentStatus.VERIFIED  # a claim of it was refused
            if before.status in (ConsentStatus.CLAIMED, ConsentStatus.FAILED):
                assert consent.token == before.token
        if before.status == ConsentStatus.REVOKED and consent.status == ConsentStatus.VERIFIED:
            raise AssertionError("a revoked consent came back without a new claim")
