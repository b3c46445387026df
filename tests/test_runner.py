"""The runner agent on a real nats-server: slots, its durable consumer, control, poison."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agents.executor import AllowedHosts, FlowReport, FlowResult
from agents.intake import SlotKey
from agents.runner import Runner
from engine.bus import Bus
from engine.jobs.decider import StartJob
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import Embedded, SteadyExecutor, embedded

pytestmark = pytest.mark.timeout(90)

SITE = "http://127.0.0.1:9/"


class GatedExecutor:
    """Each run waits until the test opens its gate; records how many run at once."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.runs: Counter[str] = Counter()
        self.running = 0
        self.peak = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        self.runs[item.flow_id] += 1
        run = (item.flow_id, self.runs[item.flow_id])
        gate = self.gates[run] = asyncio.Event()
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.put_nowait(run)
        try:
            await gate.wait()  # no keepalive: the ack wait runs out while we wait
        finally:
            self.running -= 1
        return FlowResult(clicks_done=item.clicks, pages=1)

    async def next_start(self, timeout: float = 15) -> tuple[str, int]:
        return await asyncio.wait_for(self.started.get(), timeout)

    def open(self, flow_id: str, n: int) -> None:
        self.gates[(flow_id, n)].set()


async def started_job(tb: Embedded, flows: int = 10) -> str:
    """A running job whose work items the test publishes itself (no dispatcher)."""
    await tb.authorise("127.0.0.1")
    job_id = await tb.create_job([Target(url=SITE, flows=flows)])
    await tb.jobs.execute(StartJob(job_id, frozenset({"127.0.0.1"})), "test")
    return job_id


def work_item(job_id: str, n: int, attempt: int = 1) -> FlowDispatched:
    return FlowDispatched(
        id=f"dispatch-{job_id}-{n}-{attempt}",
        at=datetime.now(UTC),
        actor="system",
        job_id=job_id,
        flow_id=f"{job_id}_0_{n}",
        attempt=attempt,
        target_index=0,
        url=SITE,
        clicks=0,
        session_seconds=0,
        allowed_hosts=["127.0.0.1"],
        seed=n,
    )


async def dispatch(bus: Bus, item: FlowDispatched) -> None:
    await bus.append(item, msg_id=subjects.dispatch_msg_id(item.flow_id, item.attempt))


async def until(condition: Callable[[], bool], changed: asyncio.Event, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            changed.clear()
            await changed.wait()


# -- item 12: slots and the durable consumer -----------------------------------------


async def test_redelivery_to_the_same_runner_frees_the_right_slot(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        job_id = await started_job(tb)
        gated = GatedExecutor()
        runner = Runner(bus, gated, slots=2)
        tb.run(runner.run(), "runner")
        first, second = work_item(job_id, 0), work_item(job_id, 1)
        await dispatch(bus, first)
        assert await gated.next_start() == (first.flow_id, 1)
        # nothing keeps the first delivery alive: after the ack wait (3 s) JetStream
        # hands the same flow to this runner again while the first still runs
        assert await gated.next_start() == (first.flow_id, 2)
        await dispatch(bus, second)  # both slots are taken: it waits
        gated.open(first.flow_id, 1)  # the first delivery ends first
        assert await gated.next_start() == (second.flow_id, 1)
        assert set(runner.runs) == {
            SlotKey(first.flow_id, 1, 2),
            SlotKey(second.flow_id, 1, 1),
        }
        assert gated.peak == 2
        gated.open(first.flow_id, 2)
        gated.open(second.flow_id, 1)
        await asyncio.wait_for(runner.wait_idle(), 10)
        assert runner.intake.held == {}
        assert runner.completed == 3


async def test_deleted_dispatch_consumer_is_recreated_and_the_job_completes(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 20
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        runner = Runner(bus, SteadyExecutor(0.05), slots=2)
        tb.run(runner.run(), "runner")
        job_id = await tb.create_job([Target(url=SITE, flows=flows)], instance_count=2)
        await tb.wait_job(job_id, lambda v: v.flows_done >= 4, timeout=60)
        with capture_logs() as logs:
            await bus.js.delete_consumer(
                subjects.EVENTS_STREAM, subjects.dispatch_consumer("linux", "chromium")
            )
            view = await tb.wait_terminal(job_id, timeout=60)
    assert view.status == "completed"
    assert (view.flows_done, view.flows_failed) == (flows, 0)
    assert runner.intake.recreated == 1
    # no busy loop: one unanswered pull noticed the loss, not thousands
    assert runner.intake.pulls <= 3
    said = Counter(line["event"] for line in logs if line["log_level"] in ("warning", "error"))
    assert said["intake.consumer_recreated"] == 1
    assert sum(said.values()) <= 3, said
