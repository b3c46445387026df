"""Where egress facts live: a consent's ports, the work item's, and EgressRefused on the log
and in the read model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from agents.egress.flow import consented_ports
from engine.consent.decider import ClaimDomain, Meta, RecordVerification, decide
from projections.queries import get_job
from projections.read_model import apply_batch, open_read_model
from schemas import subjects
from schemas.consent_state import WEB_PORTS, Consent, consent_ports, evolve_consent
from schemas.events import (
    ConsentGiven,
    EgressRefused,
    Envelope,
    FlowDispatched,
    JobCreated,
    encode_event,
)
from schemas.stored import decode_stored
from schemas.values import JobSettings, Target

T0 = datetime(2026, 1, 1, tzinfo=UTC)
META = Meta(id="e", at=T0, actor="test")


def refused(n: int, event_id: str, attempt: int = 1) -> EgressRefused:
    return EgressRefused(
        id=event_id,
        at=T0,
        actor="runner_1",
        job_id="job_1",
        flow_id="flow_1",
        attempt=attempt,
        delivery=1,
        host="127.0.0.2",
        port=8080,
        reason="host not consented",
        request="CONNECT 127.0.0.2:8080",
        n=n,
    )


def work_item(url: str, **fields: object) -> FlowDispatched:
    return FlowDispatched(
        id="d",
        at=T0,
        actor="system",
        job_id="job_1",
        flow_id="flow_1",
        attempt=1,
        target_index=0,
        url=url,
        clicks=0,
        session_seconds=1,
        allowed_hosts=["site.test", "cdn.test"],
        seed=1,
        **fields,  # type: ignore[arg-type]
    )


# -- consent ports -------------------------------------------------------------------


def test_a_verification_records_the_web_ports_and_the_port_it_was_checked_on() -> None:
    consent = Consent()
    for cmd in (
        ClaimDomain("site.test", "t1"),
        RecordVerification(
            "site.test", "t1", "http://site.test:8443/.well-known/trafficbuster.txt"
        ),
    ):
        for event in decide(consent, cmd, META):
            consent = evolve_consent(consent, event)
    assert isinstance(event, ConsentGiven)
    assert event.ports == [80, 443, 8443]
    assert consent.ports == frozenset({80, 443, 8443})


def test_ports_of_a_consent_recorded_before_ports_were_come_from_its_evidence() -> None:
    given = ConsentGiven(
        id="g", at=T0, actor="test", domain="site.test",
        evidence="https://site.test:9443/.well-known/trafficbuster.txt",
        expires_at=T0 + timedelta(days=1),
    )  # fmt: skip
    raw = encode_event(given).replace(b',"ports":[]', b"")
    old = decode_stored(subjects.subject_for(given), raw, None)
    assert isinstance(old, ConsentGiven) and old.ports == []
    assert evolve_consent(Consent(), old).ports == frozenset({80, 443, 9443})
    assert consent_ports("_trafficbuster.site.test TXT record") == WEB_PORTS
    assert consent_ports("http://site.test/") == WEB_PORTS


def test_the_work_item_carries_the_ports_and_older_items_get_the_targets() -> None:
    ports = {"site.test": [80, 443, 8080], "cdn.test": [443]}
    item = work_item("http://site.test:8080/", allowed_ports=ports)
    assert consented_ports(item) == {h: frozenset(p) for h, p in ports.items()}

    older = work_item("http://site.test:8080/")
    assert consented_ports(older) == {
        "site.test": frozenset({80, 443, 8080}),
        "cdn.test": frozenset({80, 443, 8080}),
    }


# -- EgressRefused ---------------------------------------------------------------------


def test_egress_refused_is_a_flow_event_on_its_own_subject() -> None:
    event = refused(3, "r3")
    subject = subjects.subject_for(event)
    assert subject == "tb.flow.job_1.EgressRefused"
    assert subjects.flow_msg_id(event, event.n) == "flow_1:1:EgressRefused:3"
    assert decode_stored(subject, encode_event(event), None) == event


async def test_refusals_are_counted_per_job_once_each(tmp_path: Path) -> None:
    created = JobCreated(
        id="c", at=T0, actor="test", job_id="job_1", name="j",
        targets=[Target(url="http://site.test/", flows=1)], settings=JobSettings(),
    )  # fmt: skip
    events = [
        created,
        refused(0, "r0"),
        refused(1, "r1"),
        refused(0, "r0-again"),  # the same report stored again past the dedupe window
        refused(0, "r0-attempt2", attempt=2),
    ]
    batch = [
        Envelope(seq, subjects.subject_for(e), msgspec.convert(e, type(e)))
        for seq, e in enumerate(events, 1)
    ]
    db = await open_read_model(tmp_path / "read.db")
    try:
        await apply_batch(db, batch)
        view = await get_job(db, "job_1")
    finally:
        await db.close()
    assert view is not None and view.egress_refused == 3
    assert msgspec.json.decode(msgspec.json.encode(view))["egress_refused"] == 3


def test_the_dns_mode_maps_hosts_to_addresses_only() -> None:
    raw = b'{"dns": [{"host": "Shop.test", "address": "203.0.113.7"}]}'
    settings = msgspec.json.decode(raw, type=JobSettings)
    assert settings.host_map == {"shop.test": "203.0.113.7"}
    assert JobSettings().host_map == {}  # the system resolver
    hash(settings)  # settings stay a value
    bad_address = b'{"dns": [{"host": "shop.test", "address": "shop.example"}]}'
    bad_host = b'{"dns": [{"host": "not a host", "address": "1.2.3.4"}]}'
    for bad in (bad_address, bad_host):
        try:
            msgspec.json.decode(bad, type=JobSettings)
        except msgspec.ValidationError as err:
            assert "dns" in str(err)
        else:
            raise AssertionError(f"accepted {bad!r}")
