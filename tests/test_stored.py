"""A stored message is an event only if it decodes, means something and sits where it belongs."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from schemas import subjects
from schemas.events import ConsentGiven, FlowDone, JobCreated, encode_event
from schemas.stored import Undecodable, decode_stored
from schemas.values import JobSettings, Target

AT = datetime(2026, 1, 1, tzinfo=UTC)
FIRST = {
    subjects.EXPECTED_LAST_SUBJECT_SEQ: "0",
    subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: "tb.job.job_1.*",
}


def created(**changes: object) -> dict[str, object]:
    event = JobCreated(
        id="e", at=AT, actor="t", job_id="job_1", name="n",
        targets=[Target(url="http://a.test/")], settings=JobSettings(),
    )  # fmt: skip
    return {**msgspec.to_builtins(event), **changes}


def raw(value: dict[str, object]) -> bytes:
    return msgspec.json.encode(value)


def test_a_job_created_stored_as_the_jobs_first_event_decodes() -> None:
    event = decode_stored("tb.job.job_1.JobCreated", raw(created()), FIRST)
    assert isinstance(event, JobCreated) and event.job_id == "job_1"


CREATED = "tb.job.job_1.JobCreated"
LATER = {**FIRST, subjects.EXPECTED_LAST_SUBJECT_SEQ: "7"}


@pytest.mark.parametrize(
    ("subject", "value", "headers", "why"),
    [
        (CREATED, created(), None, "first event"),
        (CREATED, created(), LATER, "first event"),
        ("tb.job.job_2.JobCreated", created(), FIRST, "belongs on tb.job.job_1.JobCreated"),
        (CREATED, created(targets=[{"url": "http://[::1"}]), FIRST, "Invalid IPv6 URL"),
        (CREATED, created(targets=[{"url": "http://a.test:99999/"}]), FIRST, "Port"),
        (CREATED, created(at="2026-01-01T00:00:00"), FIRST, "timezone"),
        ("tb.job.*.JobCreated", created(job_id="*"), FIRST, "regex"),
        ("tb.job.job_1 .JobCreated", created(job_id="job_1 "), FIRST, "regex"),
    ],
)
def test_what_is_not_an_event_where_it_is_stored_is_undecodable(
    subject: str, value: dict[str, object], headers: dict[str, str] | None, why: str
) -> None:
    with pytest.raises(Undecodable, match=why.replace("[", r"\[").replace("*", r"\*")):
        decode_stored(subject, raw(value), headers)


def test_numbers_beyond_what_the_read_model_holds_are_undecodable() -> None:
    done = FlowDone(
        id="e", at=AT, actor="r", job_id="job_1", flow_id="job_1_0_0", attempt=1,
        runner_id="r", target_index=0,
    )  # fmt: skip
    value = {**msgspec.to_builtins(done), "duration_ms": 2**63}
    with pytest.raises(Undecodable, match="duration_ms"):
        decode_stored("tb.flow.job_1.FlowDone", raw(value), None)
    assert decode_stored("tb.flow.job_1.FlowDone", encode_event(done), None) == done


def test_a_consent_expiry_without_a_time_zone_is_undecodable() -> None:
    given = ConsentGiven(id="e", at=AT, actor="t", domain="a.test", evidence="x", expires_at=AT)
    value = {**msgspec.to_builtins(given), "expires_at": "2027-01-01T00:00:00"}
    with pytest.raises(Undecodable, match="expires_at"):
        decode_stored("tb.consent.a_test.ConsentGiven", raw(value), None)
    assert decode_stored("tb.consent.a_test.ConsentGiven", encode_event(given), None) == given


def test_bytes_that_are_not_json_are_undecodable() -> None:
    with pytest.raises(Undecodable, match="not JSON"):
        decode_stored("tb.flow.job_1.FlowDone", b"\xff{", None)
