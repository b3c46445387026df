"""A runner's job log lines go out together: one message per job and window, which every
reader takes apart again; lines stored one a message still read as before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import pytest

from agents.job_log import JobLog
from engine.bus import Bus
from engine.job_logs import read_log
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.ids import short_id
from schemas.logs import (
    LogLine,
    decode_log_line,
    decode_log_lines,
    encode_log_line,
    encode_log_lines,
    log_line,
)

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def line(job_id: str, text: str) -> LogLine:
    return log_line(job_id, text, AT, "runner_t")


def item(job_id: str) -> FlowDispatched:
    return FlowDispatched(
        id="d",
        at=AT,
        actor="system",
        job_id=job_id,
        flow_id=short_id("flow"),
        attempt=1,
        target_index=0,
        url="http://127.0.0.1:9/",
        clicks=0,
        session_seconds=0,
        allowed_hosts=["127.0.0.1"],
        seed=1,
    )


def test_one_line_is_stored_as_a_line_and_several_as_an_array() -> None:
    job_id = short_id("job")
    one = encode_log_line(line(job_id, "[INFO] a"))
    assert encode_log_lines([one]) == one
    assert decode_log_line(encode_log_lines([one])) == line(job_id, "[INFO] a")
    lines = [line(job_id, f"[INFO] {n}") for n in range(3)]
    together = encode_log_lines([encode_log_line(x) for x in lines])
    assert together.startswith(b"[")
    assert decode_log_lines(together) == lines
    assert decode_log_lines(one) == [line(job_id, "[INFO] a")]


@pytest.mark.parametrize(
    "data",
    [b"not json", b'{"job_id": 1}', b"[1, 2]", b'"text"', b"[" + b'{"job_id": "x"}' + b"]"],
)
def test_a_message_holding_anything_but_lines_does_not_decode(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_log_lines(data)


def test_a_good_line_beside_a_bad_one_does_not_make_the_message_readable() -> None:
    good = encode_log_line(line(short_id("job"), "[INFO] fine"))
    with pytest.raises(msgspec.DecodeError):
        decode_log_lines(b"[" + good + b',{"level": "INFO"}]')


def test_the_id_of_lines_sent_together_is_made_of_their_keys() -> None:
    job_id = short_id("job")
    keys = [subjects.runner_log_key("flow_a", 1, 1, w) for w in ("received", "done")]
    assert subjects.runner_log_msg_id(job_id, keys) == subjects.runner_log_msg_id(job_id, keys)
    assert subjects.runner_log_msg_id(job_id, keys) != subjects.runner_log_msg_id(job_id, keys[:1])
    assert subjects.runner_log_msg_id(job_id, keys) != subjects.runner_log_msg_id(
        short_id("job"), keys
    )


async def stored_lines(bus: Bus, job_id: str) -> list[LogLine]:
    return [s.line async for batch in read_log(bus, job_id, follow=False) for s in batch]


async def logs_stored(bus: Bus) -> int:
    return (await bus.js.stream_info(subjects.LOGS_STREAM)).state.messages


async def lines_stored(bus: Bus, job_id: str, count: int) -> list[LogLine]:
    """The job's lines once there are ``count`` of them."""
    async with asyncio.timeout(10):
        while True:
            lines = await stored_lines(bus, job_id)
            if len(lines) >= count:
                return lines
            await asyncio.sleep(0.05)


async def test_lines_of_a_window_go_out_as_one_message_per_job(bus: Bus) -> None:
    job_log = JobLog(bus, "runner_t", window=0.2)
    jobs = [short_id("job"), short_id("job")]
    items = [item(jobs[n % 2]) for n in range(10)]
    for it in items:
        job_log.received(it, 1)
    for it in items:
        job_log.finished(it, 1, "done", 0.5, "")
    await lines_stored(bus, jobs[0], 10)
    await lines_stored(bus, jobs[1], 10)
    await job_log.close()
    assert await logs_stored(bus) == 2
    for job_id in jobs:
        mine = [it.flow_id for it in items if it.job_id == job_id]
        texts = [x.message for x in await stored_lines(bus, job_id)]
        assert texts == [
            f"[INFO] Flow received: {f} attempt 1 http://127.0.0.1:9/" for f in mine
        ] + [f"[SUCCESS] Flow done: {f} in 0.5s" for f in mine]
    assert (job_log.sent, job_log.lost) == (20, 0)


async def test_the_same_lines_twice_are_stored_once_and_a_redelivery_logs_again(
    bus: Bus,
) -> None:
    job_id = short_id("job")
    it = item(job_id)
    for delivery in (1, 1, 2):  # the same lines sent again, then the item's redelivery
        job_log = JobLog(bus, "runner_t", window=0)
        job_log.received(it, delivery)
        job_log.finished(it, delivery, "done", 0.5, "")
        await job_log.close()  # sends what is queued, all in one message
    await bus.nc.flush()
    lines = await lines_stored(bus, job_id, 4)
    assert await logs_stored(bus) == 2
    assert [x.message.split(":")[0] for x in lines] == [
        "[INFO] Flow received",
        "[SUCCESS] Flow done",
    ] * 2


async def test_many_lines_are_split_into_messages_of_bounded_size(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agents.job_log

    monkeypatch.setattr(agents.job_log, "BATCH_BYTES", 1000)
    job_id = short_id("job")
    job_log = JobLog(bus, "runner_t", window=0)
    items = [item(job_id) for _ in range(20)]
    for it in items:
        job_log.received(it, 1)
    await job_log.close()
    await bus.nc.flush()
    lines = await lines_stored(bus, job_id, 20)
    assert [x.message.split(": ")[1].split()[0] for x in lines] == [it.flow_id for it in items]
    messages = await logs_stored(bus)
    assert 1 < messages < 20
    assert job_log.sent == 20
