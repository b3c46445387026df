"""A work item that no runner ever finishes ends as FlowFailed(exhausted), and its job ends."""

from __future__ import annotations

import contextlib
from pathlib import Path

import nats.errors
import pytest

from engine.advisories import ExhaustedDeliveries
from engine.bus import Bus, BusConfig
from schemas import subjects
from schemas.events import FlowFailed
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import embedded


@pytest.fixture
def bus_config() -> BusConfig:
    return BusConfig(ack_wait=1.0, max_deliver=2, presence_ttl=3.0)


async def test_flow_delivered_max_times_without_outcome_fails_the_flow(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        tb.run(ExhaustedDeliveries(bus).run(), "exhausted")
        await tb.authorise("127.0.0.1")
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=1)], max_attempts=1)
        # a runner that crashes on this item every time: takes it and never answers
        crashing = await bus.js.pull_subscribe_bind(
            subjects.dispatch_consumer("linux", "chromium"), stream=subjects.EVENTS_STREAM
        )
        for _ in range(2):
            (msg,) = await crashing.fetch(1, timeout=10)
            assert msg.metadata.num_delivered in (1, 2)
        # JetStream notices the exhaustion when it would deliver again: keep pulling
        with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
            await crashing.fetch(1, timeout=3)
        await crashing.unsubscribe()
        view = await tb.wait_terminal(job_id, timeout=30)
    assert view.status == "failed"
    assert (view.flows_done, view.flows_failed) == (0, 1)
    failures = [
        env.event
        async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowFailed"), follow=False)
        for env in batch
    ]
    assert len(failures) == 1
    assert isinstance(failures[0], FlowFailed) and failures[0].reason.startswith("exhausted")
