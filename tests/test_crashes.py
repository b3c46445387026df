"""SIGKILL the engine or nats-server mid-job: nothing lost, nothing counted twice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from agents.runner import Runner
from engine.bus import Bus
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, WorkItemsSent, embedded


@pytest.mark.slow
async def test_engine_sigkilled_mid_job_resumes_without_loss_or_double_dispatch(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 40
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        sent = await WorkItemsSent().start(bus)
        engine = await tb.spawn_engine()
        tb.run(Runner(bus, SteadyExecutor(0.15), slots=4).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows, clicks=1)], instance_count=4
        )
        await tb.wait_job(job_id, lambda v: v.flows_done >= 10, timeout=60)
        engine.send_signal(signal.SIGKILL)
        await engine.wait()
        await tb.spawn_engine()
        view = await tb.wait_terminal(job_id, timeout=60)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert view.targets[0].click_done == flows
    # nothing failed, so no flow needed a second attempt, and the restarted engine
    # published no work item again (the stream would hide it: JetStream drops it by id)
    attempts = sent.of_job(job_id)
    assert len(attempts) == flows and set(attempts.values()) == {1}
    assert len(sent.sent) == flows and set(sent.sent.values()) == {1}


@pytest.mark.slow
async def test_nats_server_sigkilled_mid_job_loses_nothing(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 40
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.authorise("127.0.0.1")
        await tb.spawn_engine()
        tb.run(Runner(bus, SteadyExecutor(0.15), slots=4).run(), "runner")
        job_id = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=flows)], instance_count=4
        )
        await tb.wait_job(job_id, lambda v: v.flows_done >= 10, timeout=60)
        await nats_server.kill()  # SIGKILL: acknowledged writes must survive
        await nats_server.start()
        view = await tb.wait_terminal(job_id, timeout=90)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert view.targets[0].flow_done == flows
