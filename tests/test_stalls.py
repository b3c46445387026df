"""Stalls: a flow whose end never comes is stalled; one merely waiting in the queue is not."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from agents.runner import Runner
from engine.bus import Bus, BusConfig
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import FlowStalled, FlowStarted, JobCompleted, JobFailed
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, WorkItemsSent, embedded, lifecycle_counts, log_until


@pytest.fixture
def bus_config() -> BusConfig:
    # JetStream's redelivery budget, the floor of the stall margin: 1 s x 2
    return BusConfig(ack_wait=1.0, max_deliver=2, presence_ttl=3.0)


@pytest.mark.slow
async def test_work_waiting_in_the_queue_for_a_slot_is_not_stalled_nor_run_twice(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    """instance_count 8 on a runner with one slot: the work items queue up on the
    platform's consumer, most of them undelivered for longer than session + margin
    (0 + 2 s). Waiting for a slot is not being stuck: nothing is stalled, each flow
    runs once."""
    flows = 8
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        sent = await WorkItemsSent().start(bus)
        tb.run(Dispatcher(bus, stall_margin=0.0).run(), "dispatcher")
        tb.run(Runner(bus, SteadyExecutor(0.5), slots=1).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)],
            instance_count=flows,
            session_seconds=0,
        )
        history = await log_until(
            bus,
            [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")],
            lambda env: isinstance(env.event, JobCompleted | JobFailed),
            timeout=60,
        )
    stalled = [e.event.flow_id for e in history if isinstance(e.event, FlowStalled)]
    assert stalled == []
    runs = Counter(e.event.flow_id for e in history if isinstance(e.event, FlowStarted))
    assert len(runs) == flows and set(runs.values()) == {1}, runs
    assert set(sent.of_job(job_id).values()) == {1}  # no flow needed a second attempt
    ended = history[-1].event
    assert isinstance(ended, JobCompleted)
    assert (ended.flows_done, ended.flows_failed) == (flows, 0) == lifecycle_counts(history, 3)
