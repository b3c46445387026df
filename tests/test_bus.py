from __future__ import annotations

import asyncio

import pytest

from engine.bus import Bus, ConcurrencyConflict, Expect
from engine.ids import new_id, utcnow
from schemas import subjects
from schemas.events import JobCancelled, JobCreated
from schemas.values import JobSettings, Target


def created(job_id: str) -> JobCreated:
    return JobCreated(
        id=new_id(),
        at=utcnow(),
        actor="test",
        job_id=job_id,
        name="n",
        targets=[Target(url="http://127.0.0.1/")],
        settings=JobSettings(),
    )


async def test_provision_is_idempotent(bus: Bus) -> None:
    await bus.provision()
    await bus.provision()


async def test_same_msg_id_is_stored_once(bus: Bus) -> None:
    event = created("job_a")
    first = await bus.append(event, msg_id="m1")
    second = await bus.append(event, msg_id="m1")
    assert second.duplicate and second.seq == first.seq
    assert len(await bus.load(subjects.job_stream_filter("job_a"))) == 1


async def test_exactly_one_of_many_concurrent_writers_wins(bus: Bus) -> None:
    head = await bus.append(created("job_b"), msg_id="c")
    scope = subjects.job_stream_filter("job_b")

    async def writer(n: int) -> bool:
        event = JobCancelled(id=new_id(), at=utcnow(), actor=f"w{n}", job_id="job_b")
        try:
            await bus.append(event, msg_id=f"w{n}", expect=Expect(scope, head.seq))
        except ConcurrencyConflict:
            return False
        return True

    wins = await asyncio.gather(*(writer(n) for n in range(20)))
    assert sum(wins) == 1
    assert len(await bus.load(scope)) == 2


async def test_expect_zero_means_no_events_yet(bus: Bus) -> None:
    scope = subjects.job_stream_filter("job_c")
    await bus.append(created("job_c"), msg_id="x", expect=Expect(scope, 0))
    with pytest.raises(ConcurrencyConflict):
        await bus.append(created("job_c"), msg_id="y", expect=Expect(scope, 0))


async def test_read_follows_new_events_in_order(bus: Bus) -> None:
    for n in range(5):
        await bus.append(created(f"job_{n}"), msg_id=f"r{n}")
    seen: list[int] = []

    async def follow() -> None:
        async for batch in bus.read(1):
            seen.extend(e.seq for e in batch)
            if len(seen) >= 8:
                return

    task = asyncio.create_task(follow())
    for n in range(5, 8):
        await bus.append(created(f"job_{n}"), msg_id=f"r{n}")
    await asyncio.wait_for(task, 10)
    assert seen == sorted(seen) and len(seen) == 8
