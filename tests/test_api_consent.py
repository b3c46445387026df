"""Consent through HTTP and its service: a claim cannot undo a verification, verify renews,
revoke retires the token, and every answer is what the log holds."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from litestar.testing import AsyncTestClient

from engine.bus import Bus
from engine.consent import ConsentCommands
from engine.errors import Conflict
from schemas import subjects
from schemas.consent_state import Consent, ConsentStatus
from schemas.events import ConsentGiven, DomainClaimed
from tests.api_client import client
from tests.conftest import NatsServer
from tests.sites import recording_site

__all__ = ["client"]  # fixtures

D = "127.0.0.1"


async def consent_events(nats_server: NatsServer, domain: str = D) -> list[object]:
    async with await Bus.connect(nats_server.url, name="test-read") as bus:
        return [env.event for env in await bus.load(subjects.consent_stream_filter(domain))]


async def claim(client: AsyncTestClient, **headers: str) -> dict[str, object]:
    r = await client.post("/api/v1/consents", json={"domain": D}, headers=headers)
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


async def verify(client: AsyncTestClient, token: str) -> dict[str, object]:
    with recording_site(token=token) as site:
        r = await client.post(f"/api/v1/consents/{D}/verify", json={"base_url": site.base_url})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


async def consent_view(client: AsyncTestClient, min_seq: int) -> dict[str, object]:
    # the consents list has no min_seq: wait on the jobs list, which shares the read model
    await client.get(f"/api/v1/jobs?min_seq={min_seq}")
    (view,) = [c for c in (await client.get("/api/v1/consents")).json() if c["domain"] == D]
    result: dict[str, object] = view
    return result


async def test_claiming_a_verified_domain_is_409_and_leaves_it_verified(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    claimed = await claim(client)
    verified = await verify(client, str(claimed["token"]))
    r = await client.post("/api/v1/consents", json={"domain": D})
    assert r.status_code == 409, r.text
    assert r.json()["field"] == "domain"
    assert r.json()["rule"] == f"{D} is verified; revoke it first or verify again to renew"
    view = await consent_view(client, int(str(verified["seq"])))
    assert view["status"] == "verified"
    assert [type(e).__name__ for e in await consent_events(nats_server)] == [
        "DomainClaimed",
        "ConsentGiven",
    ]


async def test_claiming_a_claimed_or_failed_domain_answers_its_current_token(
    client: AsyncTestClient,
) -> None:
    first = await claim(client)
    again = await claim(client)
    assert (again["token"], again["seq"]) == (first["token"], first["seq"])
    with recording_site(token="wrong") as site:
        r = await client.post(f"/api/v1/consents/{D}/verify", json={"base_url": site.base_url})
    assert r.status_code == 422
    after_failure = await claim(client)
    assert after_failure["token"] == first["token"]


async def test_verify_on_a_verified_domain_renews_its_expiry(client: AsyncTestClient) -> None:
    claimed = await claim(client)
    first = await verify(client, str(claimed["token"]))
    second = await verify(client, str(claimed["token"]))
    assert int(str(second["seq"])) > int(str(first["seq"]))
    assert str(second["expires_at"]) > str(first["expires_at"])
    view = await consent_view(client, int(str(second["seq"])))
    assert (view["status"], view["expires_at"]) == ("verified", second["expires_at"])


async def test_revoke_retires_the_token_and_a_new_claim_mints_another(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    claimed = await claim(client)
    await verify(client, str(claimed["token"]))
    r = await client.post(f"/api/v1/consents/{D}/revoke", json={"reason": "owner asked"})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "revoked"
    view = await consent_view(client, r.json()["seq"])
    assert (view["status"], view["reason"]) == ("revoked", "owner asked")

    with recording_site(token=str(claimed["token"])) as site:  # the old token, still served
        again = await client.post(f"/api/v1/consents/{D}/verify", json={"base_url": site.base_url})
    assert again.status_code == 409, again.text
    assert "claim it again" in again.json()["rule"]

    twice = await client.post(f"/api/v1/consents/{D}/revoke", json={"reason": "again"})
    assert twice.status_code == 409 and "already revoked" in twice.json()["rule"]

    reclaimed = await claim(client)
    assert reclaimed["token"] != claimed["token"]
    with recording_site(token=str(claimed["token"])) as site:
        stale = await client.post(f"/api/v1/consents/{D}/verify", json={"base_url": site.base_url})
    assert stale.status_code == 422 and "does not serve the claimed token" in stale.text
    await verify(client, str(reclaimed["token"]))
    kinds = [type(e).__name__ for e in await consent_events(nats_server)]
    assert kinds == [
        "DomainClaimed",
        "ConsentGiven",
        "ConsentRevoked",
        "DomainClaimed",
        "ConsentVerificationFailed",
        "ConsentGiven",
    ]


async def test_revoking_an_unclaimed_domain_is_404(client: AsyncTestClient) -> None:
    r = await client.post("/api/v1/consents/example.com/revoke", json={"reason": "x"})
    assert r.status_code == 404 and r.json()["field"] == "domain"


async def test_concurrent_first_claims_all_answer_the_one_stored_token(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    answers = await asyncio.gather(
        *(client.post("/api/v1/consents", json={"domain": D}) for _ in range(30))
    )
    assert {r.status_code for r in answers} == {201}
    events = await consent_events(nats_server)
    assert len(events) == 1 and isinstance(events[0], DomainClaimed)
    assert {r.json()["token"] for r in answers} == {events[0].token}


async def test_concurrent_first_claims_through_the_service_store_one_token(bus: Bus) -> None:
    """Fifty writers of one new domain at one version: one DomainClaimed, one token."""
    commands = [ConsentCommands(bus) for _ in range(50)]
    answers = await asyncio.gather(*(c.claim("race.test", "test") for c in commands))
    stored = [env.event for env in await bus.load(subjects.consent_stream_filter("race.test"))]
    assert len(stored) == 1 and isinstance(stored[0], DomainClaimed)
    assert {token for token, _ in answers} == {stored[0].token}


async def test_a_claim_retried_with_its_key_answers_what_it_stored(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    first = await claim(client, **{"Idempotency-Key": "claim-1"})
    retry = await claim(client, **{"Idempotency-Key": "claim-1"})
    assert retry == first
    assert len(await consent_events(nats_server)) == 1


async def test_verify_appends_at_the_version_it_read_so_a_revoke_in_between_wins(
    bus: Bus,
) -> None:
    """The token is fetched between reading the consent and appending: a revocation that
    lands meanwhile makes the verification a conflict, never a resurrection."""
    setup = ConsentCommands(bus)
    token, _ = await setup.claim(D, "test")
    with recording_site(token=token) as site:
        await setup.verify(D, site.base_url, "test")

        async def fetch_while_revoked(url: str) -> str:
            await setup.revoke(D, "revoked while the token was fetched", "test")
            return token  # the page still serves the old token

        racing = ConsentCommands(bus, fetch=fetch_while_revoked)
        with pytest.raises(Conflict) as refused:
            await racing.verify(D, site.base_url, "test")
    assert "claim it again" in refused.value.rule
    consent = await setup.load(D)
    assert consent.status == ConsentStatus.REVOKED
    stored = [env.event for env in await bus.load(subjects.consent_stream_filter(D))]
    assert [type(e).__name__ for e in stored] == ["DomainClaimed", "ConsentGiven", "ConsentRevoked"]
    assert sum(isinstance(e, ConsentGiven) for e in stored) == 1


async def test_a_verified_consent_past_its_expiry_is_listed_as_expired(
    client: AsyncTestClient, nats_server: NatsServer
) -> None:
    now = datetime.now(UTC)
    async with await Bus.connect(nats_server.url, name="test-write") as bus:
        for domain, expires_at in (
            ("old.test", now - timedelta(seconds=1)),
            ("new.test", now + timedelta(days=1)),
        ):
            for n, event in enumerate((
                DomainClaimed(id=f"{domain}-c", at=now, actor="t", domain=domain, token="tk"),
                ConsentGiven(
                    id=f"{domain}-g", at=now, actor="t", domain=domain,
                    evidence=f"http://{domain}/.well-known/trafficbuster.txt",
                    expires_at=expires_at,
                ),
            )):  # fmt: skip
                seq = (await bus.append(event, msg_id=f"{domain}-{n}")).seq
    await client.get(f"/api/v1/jobs?min_seq={seq}")
    listed = {c["domain"]: c["status"] for c in (await client.get("/api/v1/consents")).json()}
    assert listed == {"old.test": "expired", "new.test": "verified"}
    # the rule every reader shares: what authorises nothing is never reported verified
    for status in ConsentStatus:
        for expires_at in (None, now - timedelta(seconds=1), now + timedelta(seconds=1)):
            consent = Consent(domain="a.test", status=status, expires_at=expires_at)
            assert (consent.status_at(now) == ConsentStatus.VERIFIED) == consent.valid_at(now)
            assert consent.status_at(now) != ConsentStatus.VERIFIED or status == "verified"
