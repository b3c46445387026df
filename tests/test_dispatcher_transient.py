"""NATS trouble (timeouts, no responders, a JetStream that answers 503) is waited out.

The dispatcher and the exhausted-delivery watch run on a real nats-server through a
bus whose next calls fail as they do while NATS is briefly unavailable; neither may
end, the job must come out exact, and each episode is logged once, not each retry.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from structlog.testing import capture_logs

from agents.runner import Runner
from engine.bus import Bus
from engine.dispatcher import Dispatcher
from schemas import subjects
from schemas.events import FlowDispatched, JobCompleted, JobFailed
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, embedded, flaky_bus, lifecycle_counts, log_until


def unavailable() -> Exception:
    return nats.js.errors.ServiceUnavailableError(code=503, description="JetStream unavailable")


@pytest.mark.slow
async def test_the_dispatcher_waits_out_nats_trouble_and_says_so_once_per_episode(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 12
    faults: dict[str, list[Exception]] = {
        "last_seq": [nats.errors.TimeoutError()],
        "read_batches": [nats.errors.NoRespondersError()],
        "append": [unavailable(), nats.errors.TimeoutError()],  # starting the job, twice
        "append_pipelined": [nats.errors.TimeoutError() for _ in range(3)],  # acks lost
    }
    with capture_logs() as logs:
        async with (
            flaky_bus(nats_server.url, faults) as flaky,
            embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb,
        ):
            await tb.authorise("127.0.0.1")
            dispatcher = asyncio.create_task(Dispatcher(flaky).run(), name="dispatcher")
            tb.tasks.append(dispatcher)
            tb.run(Runner(bus, SteadyExecutor(0.01), slots=4).run(), "runner")
            job_id = await tb.create_job(
                [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=4
            )
            history = await log_until(
                bus,
                [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")],
                lambda env: isinstance(env.event, JobCompleted | JobFailed),
            )
            assert not dispatcher.done()
    assert all(not pending for pending in faults.values())  # every fault was met
    ended = history[-1].event
    assert isinstance(ended, JobCompleted)
    assert (ended.flows_done, ended.flows_failed) == (flows, 0) == lifecycle_counts(history, 3)
    attempts = Counter(
        [
            env.event.flow_id
            async for batch in bus.read(1, subjects.ALL_DISPATCH, follow=False)
            for env in batch
            if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id
        ]
    )
    assert len(attempts) == flows and set(attempts.values()) == {1}  # nothing dispatched twice
    episodes = Counter(e["loop"] for e in logs if e["event"] == "nats.unavailable")
    recovered = [e for e in logs if e["event"] == "nats.available" and e["loop"] == "dispatcher"]
    # 6 failures, 2 episodes: start-up, then one tick that failed 5 times in a row (the
    # job's start twice, then its dispatch three times) before it got through
    assert episodes == {"dispatcher": 2, "dispatcher-reader": 1}
    assert sorted(e["retries"] for e in recovered) == [1, 5]
