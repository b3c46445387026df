"""One job's fault stays in that job's lane: it ends with the reason, the engine goes on."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import msgspec
import nats.js.errors
import pytest
from structlog.testing import capture_logs

import engine.dispatch.state as dispatch_state
from agents.runner import Runner
from engine.bus import Bus
from engine.dispatch.snapshot import SNAPSHOT_OBJECT
from engine.jobs.decider import Job
from schemas import subjects
from schemas.events import JobCompleted, JobFailed, JobRefused
from schemas.values import JobSettings, Platform, Target
from tests.conftest import NatsServer
from tests.harness import Embedded, SteadyExecutor, embedded, log_until

URL = "http://127.0.0.1:9/"


async def forge_job_created(bus: Bus, job_id: str) -> int:
    """A JobCreated published straight to the stream, past the API: its URL does not parse."""
    raw = msgspec.json.encode(
        {
            "type": "JobCreated",
            "id": "forged",
            "at": "2026-01-01T00:00:00Z",
            "actor": "mallory",
            "job_id": job_id,
            "name": "forged",
            "targets": [{"url": "http://[::1", "flows": 1}],
            "settings": {},
        }
    )
    ack = await bus.js.publish(
        subjects.job_subject(job_id, "JobCreated"),
        raw,
        headers={
            subjects.EXPECTED_LAST_SUBJECT_SEQ: "0",
            subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: subjects.job_stream_filter(job_id),
        },
    )
    return ack.seq


async def completes(tb: Embedded) -> None:
    """The engine is up: a valid job runs to the end with exact counts."""
    job_id = await tb.create_job([Target(url=URL, flows=3)], instance_count=3)
    view = await tb.wait_terminal(job_id, timeout=60)
    assert (view.status, view.flows_done, view.flows_failed) == ("completed", 3, 0)


@pytest.mark.slow  # kills the engine process
async def test_a_forged_job_with_a_bad_url_is_refused_and_the_engine_stays_up_across_restarts(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        engine = await tb.spawn_engine()
        tb.run(Runner(bus, SteadyExecutor(0.01), slots=4).run(), "runner")
        forged_seq = await forge_job_created(bus, "job_forged")
        history = await log_until(
            bus,
            subjects.job_stream_filter("job_forged"),
            lambda env: isinstance(env.event, JobRefused),
        )
        refused = history[-1].event
        assert isinstance(refused, JobRefused) and "url" in refused.reason
        assert history[-1].seq > forged_seq
        await completes(tb)
        engine.send_signal(signal.SIGKILL)  # and again on the same state: read from the start
        await engine.wait()
        store = await bus.js.object_store(subjects.DISPATCHER_BUCKET)
        with contextlib.suppress(nats.js.errors.ObjectNotFoundError):
            await store.delete(SNAPSHOT_OBJECT)
        engine = await tb.spawn_engine()
        await completes(tb)
        assert engine.returncode is None
        engine.send_signal(signal.SIGTERM)  # and after a graceful stop
        await engine.wait()
        engine = await tb.spawn_engine()
        await completes(tb)
        assert engine.returncode is None
    refusals = [
        env.event
        async for batch in bus.read(1, subjects.job_stream_filter("job_forged"), follow=False)
        for env in batch
    ]
    assert refusals == [refused]  # refused once, whatever the restarts


async def test_an_exception_planning_one_job_fails_that_job_only(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_seed: Callable[[Job, str], int] = dispatch_state.flow_seed

    def seed(job: Job, flow: str) -> int:
        if job.name == "faulty":
            raise RuntimeError("injected planning fault")
        return real_seed(job, flow)

    monkeypatch.setattr(dispatch_state, "flow_seed", seed)
    with capture_logs() as logs:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1")
            tb.run(Runner(bus, SteadyExecutor(0.01), slots=4).run(), "runner")
            faulty, _ = await tb.jobs.create(
                name="faulty",
                targets=[Target(url=URL, flows=2)],
                settings=JobSettings(instance_count=2),
                platform=Platform(),
                actor="test",
            )
            await completes(tb)
            history = await log_until(
                bus,
                subjects.job_stream_filter(faulty),
                lambda env: isinstance(env.event, JobFailed | JobCompleted),
            )
            await completes(tb)  # and the dispatcher goes on
    failed = history[-1].event
    assert isinstance(failed, JobFailed)
    assert "injected planning fault" in failed.reason
    broken = [e for e in logs if e["event"] == "job.broken"]
    assert [e["job_id"] for e in broken] == [faulty]  # logged once
    assert broken[0]["exc_info"] is not None  # with its traceback
