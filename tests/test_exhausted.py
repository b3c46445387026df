"""A work item that no runner ever finishes ends as FlowFailed(exhausted), and its job ends."""

from __future__ import annotations

import contextlib
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from engine.advisories import ExhaustedDeliveries
from engine.bus import Bus, BusConfig
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import FlowDispatched, FlowFailed, FlowStalled, JobCompleted, JobFailed
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import embedded, flaky_bus, log_until


@pytest.fixture
def bus_config() -> BusConfig:
    return BusConfig(ack_wait=1.0, max_deliver=2, presence_ttl=3.0)


@pytest.mark.slow
async def test_flow_delivered_max_times_without_outcome_fails_the_flow(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Also while NATS has trouble: the watch's first appends fail and it waits them out."""
    faults: dict[str, list[Exception]] = {
        "append": [nats.errors.TimeoutError(), nats.js.errors.ServiceUnavailableError()]
    }
    async with (
        flaky_bus(nats_server.url, faults) as flaky,
        embedded(bus, nats_server.url, tmp_path) as tb,
    ):
        tb.run(ExhaustedDeliveries(flaky).run(), "exhausted")
        await tb.authorise("127.0.0.1")
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=1)], max_attempts=1)
        # a runner that crashes on this item every time: takes it and never answers
        crashing = await bus.js.pull_subscribe_bind(
            subjects.dispatch_consumer("linux", "chromium"), stream=subjects.EVENTS_STREAM
        )
        deliveries: list[int] = []

        async def take_and_crash() -> None:
            # JetStream notices the exhaustion when it would deliver again: keep pulling
            while True:
                with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                    (msg,) = await crashing.fetch(1, timeout=1)
                    deliveries.append(msg.metadata.num_delivered)

        tb.run(take_and_crash(), "crashing-runner")
        view = await tb.wait_terminal(job_id, timeout=30)
        for task in tb.tasks:
            task.cancel()
        await crashing.unsubscribe()
    assert deliveries == [1, 2]
    assert faults["append"] == []  # both failures were met, and waited out
    assert view.status == "failed"
    assert (view.flows_done, view.flows_failed) == (0, 1)
    failures = [
        env.event
        async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowFailed"), follow=False)
        for env in batch
    ]
    assert len(failures) == 1
    assert isinstance(failures[0], FlowFailed) and failures[0].reason.startswith("exhausted")


@pytest.mark.slow
async def test_a_flow_whose_end_never_arrives_is_stalled_then_failed_without_the_advisory(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    """The max-deliveries advisory is lost (nothing captures it): the dispatcher's own
    deadline ends the flow, after its session plus a margin no shorter than JetStream's
    redelivery budget (ack wait 1 s x max deliver 2 here)."""
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        tb.run(Dispatcher(bus, stall_margin=0.0).run(), "dispatcher")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=1)], max_attempts=2, session_seconds=0
        )
        silent = await bus.js.pull_subscribe_bind(
            subjects.dispatch_consumer("linux", "chromium"), stream=subjects.EVENTS_STREAM
        )

        async def take_and_never_answer() -> None:
            while True:
                with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
                    await silent.fetch(1, timeout=1)

        tb.run(take_and_never_answer(), "silent-runner")
        history = await log_until(
            bus,
            [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")],
            lambda env: isinstance(env.event, JobFailed | JobCompleted),
            timeout=30,
        )
        for task in tb.tasks:
            task.cancel()
        await silent.unsubscribe()
    stalls = [e.event for e in history if isinstance(e.event, FlowStalled)]
    assert [s.attempt for s in stalls] == [1, 2]  # redispatched once, then out of attempts
    assert all(s.waited_seconds >= 2.0 for s in stalls)  # never under ack_wait x max_deliver
    ended = history[-1].event
    assert isinstance(ended, JobFailed) and (ended.flows_done, ended.flows_failed) == (0, 1)
    items = [
        env.event
        async for batch in bus.read(1, subjects.ALL_DISPATCH, follow=False)
        for env in batch
        if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id
    ]
    assert [i.attempt for i in items] == [1, 2]
