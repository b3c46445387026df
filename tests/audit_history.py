"""A small history for audit tests: two jobs by two users and a runner between them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from engine.bus import Bus, Expect
from schemas import subjects
from schemas.events import (
    Event,
    FlowDispatched,
    FlowDone,
    JobCreated,
    JobStarted,
    RunnerRegistered,
)
from schemas.values import JobSettings, Platform, Target

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
URL = "http://127.0.0.1:9/"


def at(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def job_events(job: str, actor: str, start: int, flows: int = 2) -> list[Event]:
    """A job created by ``actor``, started, and its flows dispatched and done by a runner."""
    common: dict[str, Any] = {"job_id": job}
    events: list[Event] = [
        JobCreated(
            id=f"{job}-c", at=at(start), actor=actor, **common, name=job,
            targets=[Target(url=URL, flows=flows)], settings=JobSettings(),
        ),
        JobStarted(
            id=f"{job}-s", at=at(start + 1), actor="system", **common, flows_total=flows,
            allowed_hosts=["127.0.0.1"],
        ),
    ]  # fmt: skip
    for n in range(flows):
        ids = {**common, "flow_id": f"{job}-f{n}", "attempt": 1}
        events.append(
            FlowDispatched(
                id=f"{job}-d{n}", at=at(start + 2 + n), actor="system", **ids, target_index=0,
                url=URL, clicks=0, session_seconds=0, allowed_hosts=["127.0.0.1"], seed=n,
            )
        )  # fmt: skip
        events.append(
            FlowDone(
                id=f"{job}-x{n}", at=at(start + 3 + n), actor="runner-1", **ids,
                runner_id="runner-1", target_index=0,
            )
        )  # fmt: skip
    return events


async def store(bus: Bus, events: list[Event]) -> int:
    seq = 0
    for event in events:
        expect = None
        if isinstance(event, JobCreated):
            expect = Expect(subjects.job_stream_filter(event.job_id), 0)
        seq = (await bus.append(event, msg_id=event.id, expect=expect)).seq
    return seq


async def history(bus: Bus) -> int:
    """Two jobs by two users, a runner registered between them; returns the last seq."""
    await store(bus, job_events("job_a", "alice", 0))
    runner = RunnerRegistered(
        id="r1", at=at(100), actor="runner-1", runner_id="runner-1", platform=Platform(), slots=2
    )
    await store(bus, [runner])
    return await store(bus, job_events("job_b", "bob", 200, flows=3))
