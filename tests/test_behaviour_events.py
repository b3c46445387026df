"""Behaviour in the log: the new fields and PageLeft decode where they are stored, and
events written before them still decode."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from schemas import subjects
from schemas.devices import DeviceProfile
from schemas.events import (
    TRAIL_LENGTH,
    ClickDone,
    FlowDispatched,
    FlowDone,
    JobCreated,
    LinkPick,
    PageLeft,
    PageTimings,
    PageVisited,
    encode_event,
    event_schema,
)
from schemas.stored import Undecodable, decode_stored
from schemas.values import JobSettings, SessionDuration, Target

AT = datetime(2026, 1, 1, tzinfo=UTC)
FLOW = {"id": "e", "at": AT, "actor": "r", "job_id": "job_1", "flow_id": "job_1_0_0", "attempt": 1}
FIRST = {
    subjects.EXPECTED_LAST_SUBJECT_SEQ: "0",
    subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: "tb.job.job_1.*",
}


def stored(event: object) -> object:
    assert isinstance(event, PageLeft | PageVisited | ClickDone | FlowDone | FlowDispatched)
    return decode_stored(subjects.subject_for(event), encode_event(event), None)


def test_page_left_and_the_new_fields_decode_where_they_are_stored() -> None:
    timings = PageTimings(ttfb_ms=12.5, dom_content_loaded_ms=40, load_ms=41, fcp_ms=50, cls=0.1)
    left = PageLeft(
        **FLOW, url="http://a.test/", n=1, dwell_ms=2500, scrolls=[300, -120],
        pauses_ms=[400, 900, 700], moves=[(640, 300)], timings=timings,
    )  # fmt: skip
    assert subjects.subject_for(left) == "tb.flow.job_1.PageLeft"
    assert stored(left) == left
    visited = PageVisited(**FLOW, url="http://a.test/", status=200, timings=timings)
    assert stored(visited) == visited
    link = LinkPick(index=2, candidates=5, external=True)
    click = ClickDone(**FLOW, target_index=0, href="http://b.test/", link=link)
    assert stored(click) == click
    done = FlowDone(**FLOW, runner_id="r", target_index=0, device="iPhone 13", delay_ms=1500)
    assert stored(done) == done
    settings = JobSettings(
        session_duration=SessionDuration(mode="variable", min_seconds=1, max_seconds=2),
        devices=(DeviceProfile(name="Pixel 7"),),
    )
    item = FlowDispatched(
        **FLOW, target_index=0, url="http://a.test/", clicks=1, session_seconds=2,
        allowed_hosts=["a.test"], seed=3, settings=settings,
    )  # fmt: skip
    assert stored(item) == item
    assert "PageLeft" in str(event_schema())


def test_events_written_before_the_behaviour_fields_still_decode() -> None:
    old_visit = {**FLOW, "type": "PageVisited", "url": "http://a.test/", "status": 200, "n": 0}
    old_item = {
        **FLOW, "type": "FlowDispatched", "target_index": 0, "url": "http://a.test/",
        "clicks": 0, "session_seconds": 5.0, "allowed_hosts": ["a.test"], "seed": 1,
    }  # fmt: skip
    old_settings = {"instance_count": 1, "session_seconds": 5.0, "max_attempts": 3, "priority": 0}
    old_job = {
        "id": "e", "at": AT, "actor": "t", "type": "JobCreated", "job_id": "job_1", "name": "n",
        "targets": [{"url": "http://a.test/"}], "settings": old_settings,
    }  # fmt: skip
    visit = decode_stored("tb.flow.job_1.PageVisited", msgspec.json.encode(old_visit), None)
    assert isinstance(visit, PageVisited) and visit.timings is None
    item = decode_stored("tb.dispatch.linux.chromium", msgspec.json.encode(old_item), None)
    assert isinstance(item, FlowDispatched) and item.settings is None
    assert item.device_catalogue is None  # from before catalogue versions: version 1
    job = decode_stored("tb.job.job_1.JobCreated", msgspec.json.encode(old_job), FIRST)
    assert isinstance(job, JobCreated) and job.device_catalogue is None
    assert job.settings.session == SessionDuration(seconds=5.0) and job.settings.page_traffic == 1


def test_a_device_name_the_catalogue_lost_does_not_make_a_job_undecodable() -> None:
    settings = JobSettings(devices=(DeviceProfile(name="Phone Of The Future"),))
    job = JobCreated(
        id="e", at=AT, actor="t", job_id="job_1", name="n",
        targets=[Target(url="http://a.test/")], settings=settings,
    )  # fmt: skip
    assert decode_stored("tb.job.job_1.JobCreated", encode_event(job), FIRST) == job


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("scrolls", [1] * (TRAIL_LENGTH + 1), "scrolls"),
        ("dwell_ms", -1, "dwell_ms"),
        ("timings", {"cls": -0.5}, "cls"),
    ],
)
def test_a_page_left_out_of_bounds_is_undecodable(field: str, value: object, why: str) -> None:
    left = {**msgspec.to_builtins(PageLeft(**FLOW, url="http://a.test/")), field: value}
    with pytest.raises(Undecodable, match=why):
        decode_stored("tb.flow.job_1.PageLeft", msgspec.json.encode(left), None)
