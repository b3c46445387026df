"""Poison messages on every subject family mid-job: quarantined once each, listed by the API,
skipped by every reader; the job completes with exact counts and the system stays ready."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from agents.runner import Runner
from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus, ConcurrencyConflict, Expect
from engine.jobs.decider import CancelJob
from engine.jobs.service import JobCommands
from schemas import subjects
from schemas.events import FlowDone, JobCancelled, JobPaused, encode_event
from schemas.values import JobSettings, Platform, Target
from tests.api_client import TEST_IDENTITY, log_in, when_registered
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, embedded

WAIT = 60.0
AT = datetime(2026, 1, 1, tzinfo=UTC)


def garbage(job_id: str) -> list[tuple[str, bytes]]:
    """(subject, bytes): something no reader may take as an event, on every family."""
    cancel = JobCancelled(id="g-cancel", at=AT, actor="x", job_id=job_id, reason="forged")
    done_elsewhere = FlowDone(
        id="g-done", at=AT, actor="x", job_id=job_id, flow_id="f_x", attempt=1,
        runner_id="r", target_index=0,
    )  # fmt: skip
    return [
        (subjects.job_subject(job_id, "JobPaused"), b"{not json"),  # bad JSON
        (subjects.flow_subject(job_id, "FlowDone"), b'{"type": "FlowDone", "id": "x"}'),  # shape
        (subjects.runner_subject("runner_x", "RunnerExploded"), b'{"type": "RunnerExploded"}'),
        (subjects.consent_subject("example.com", "ConsentGiven"), encode_event(cancel)),  # place
        (subjects.flow_subject("job_other", "FlowDone"), encode_event(done_elsewhere)),  # ids
        (subjects.dispatch_subject("linux", "chromium"), b"\xff\xfe not a work item"),
        ("tb.dataset.d1.DatasetCreated", b"[]"),
        ("tb.schedule.s1.ScheduleFired", b"null"),
        ("tb.user.u1.UserCreated", b'{"type": "UserCreated"}'),
        ("tb.proxy.p1.ProxyMarkedBad", b"\x00\x01\x02"),
    ]


async def test_garbage_on_every_subject_family_mid_job_is_quarantined_and_listed_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        runner = Runner(bus, SteadyExecutor(0.05), slots=2, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        async with asyncio.timeout(WAIT):
            await registered.wait()
        async with AsyncTestClient(app=app) as client:
            await log_in(client)
            job = {
                "name": "under fire",
                "targets": [{"url": "http://127.0.0.1:9/", "flows": 30, "clicks": 1}],
                "settings": {"instance_count": 2, "session_seconds": 0},
            }
            created = (await client.post("/api/v1/jobs", json=job)).json()
            job_id = created["job_id"]
            await tb.wait_job(job_id, lambda v: v.flows_done >= 4, timeout=WAIT)

            stored: dict[int, str] = {}
            for subject, data in garbage(job_id):
                ack = await bus.js.publish(subject, data, stream=subjects.EVENTS_STREAM)
                stored[ack.seq] = subject
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text

            view = await tb.wait_terminal(job_id, timeout=WAIT)
            assert (view.status, view.flows_done, view.flows_failed) == ("completed", 30, 0)
            assert view.targets[0].click_done == 30
            through_api = await client.get(f"/api/v1/jobs/{job_id}?min_seq={max(stored)}")
            assert through_api.json()["flows_done"] == 30

            after = (await client.post("/api/v1/jobs", json={**job, "name": "after"})).json()
            later = await tb.wait_terminal(after["job_id"], timeout=WAIT)
            assert (later.status, later.flows_done, later.flows_failed) == ("completed", 30, 0)
            assert (await client.get("/readyz")).status_code == 200

            listed = await all_quarantined(client)
    assert sorted(item["seq"] for item in listed) == sorted(stored)
    for item in listed:
        assert item["stream"] == subjects.EVENTS_STREAM
        assert item["subject"] == stored[item["seq"]]
        assert item["reason"] and item["detected_by"]
        data = dict(garbage(job_id))[item["subject"]]
        assert base64.b64decode(item["raw_base64"]) == data
        assert item["size"] == len(data) and item["preview"].isprintable()


async def all_quarantined(client: AsyncTestClient) -> list[dict[str, object]]:
    """Every page, two at a time, through the cursor."""
    items: list[dict[str, object]] = []
    after = 0
    while True:
        page = await client.get(f"/api/v1/quarantine?limit=2&after={after}")
        assert page.status_code == 200, page.text
        body = msgspec.json.decode(page.content)
        items.extend(body["items"])
        if body["next_after"] == after:
            return items
        after = body["next_after"]


async def test_garbage_on_an_aggregates_subjects_does_not_move_its_version(bus: Bus) -> None:
    """Only events move an aggregate on: an append expecting the last event's sequence
    goes through past quarantined messages, and still conflicts with a real event."""
    jobs = JobCommands(bus)
    job_id, _ = await jobs.create(
        name="j", targets=[Target(url="http://a.test/")], settings=JobSettings(),
        platform=Platform(), actor="test",
    )  # fmt: skip
    loaded = await jobs.load(job_id)
    await bus.js.publish(subjects.job_subject(job_id, "JobPaused"), b"{garbage")
    await bus.js.publish(subjects.job_subject(job_id, "JobPaused"), b"[]")
    cancelled = await jobs.execute(CancelJob(job_id, "test"), "test")
    assert cancelled.seq > loaded.version
    assert (await jobs.load(job_id)).status == "cancelled"

    stale = Expect(subjects.job_stream_filter(job_id), loaded.version)  # before the cancel
    paused = JobPaused(id="p", at=AT, actor="test", job_id=job_id)
    with pytest.raises(ConcurrencyConflict):
        await bus.append(paused, msg_id="cmd:stale:0", expect=stale)
