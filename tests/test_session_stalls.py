"""The stall clock gives a flow the longest session and traffic delay its job's settings
allow: a flow within a variable session is not stalled."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.runner import Runner
from engine.bus import Bus, BusConfig
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import FlowStalled, JobCompleted, JobFailed
from schemas.values import SecondsRange, SessionDuration, Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, embedded, log_until


@pytest.fixture
def bus_config() -> BusConfig:
    # JetStream's redelivery budget, the floor of the stall margin: 1 s x 2
    return BusConfig(ack_wait=1.0, max_deliver=2, presence_ttl=3.0)


@pytest.mark.parametrize(
    ("settings", "stalls"),
    [
        # a 3.5 s flow in a session of up to 3 s with up to 1 s of delay: within time
        (
            {
                "session_duration": SessionDuration(mode="variable", min_seconds=1, max_seconds=3),
                "traffic_delay": SecondsRange(min_seconds=0, max_seconds=1),
            },
            False,
        ),
        # the same flow in a constant session of 0 s: stalled after the 2 s margin
        ({"session_seconds": 0}, True),
    ],
)
@pytest.mark.slow
async def test_a_flow_within_its_longest_session_is_not_stalled(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, settings: dict[str, object], stalls: bool
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        tb.run(Dispatcher(bus, stall_margin=0.0).run(), "dispatcher")
        tb.run(Runner(bus, SteadyExecutor(3.5), slots=1).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=1)], max_attempts=1, **settings
        )
        history = await log_until(
            bus,
            [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")],
            lambda env: isinstance(env.event, JobCompleted | JobFailed),
            timeout=30,
        )
    stalled = [e.event for e in history if isinstance(e.event, FlowStalled)]
    assert bool(stalled) is stalls
