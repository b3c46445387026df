"""A rebuild decodes and folds in a process of its own: it folds as the projector does,
quarantines what every reader quarantines, and a fold that fails or dies is an error of
the rebuild, never a hang."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from engine.bus import Bus
from engine.quarantine import list_quarantined
from projections.fold_process import FoldFailed, FoldProcess, Stored
from projections.read_model import applied_seq, apply_batch, open_read_model
from projections.replay import dump_tables, rebuild
from schemas import subjects
from schemas.events import Envelope, JobStarted, TbEvent, encode_event
from tests.test_bus import GARBAGE
from tests.test_projections import append, dispatched, done, ev, job


def history() -> list[Envelope]:
    events: list[TbEvent] = [
        job("job_p"),
        ev(JobStarted, job_id="job_p", flows_total=2, allowed_hosts=["site.test"]),
        dispatched("job_p", "f1"),
        done("job_p", "f1"),
    ]
    return [
        Envelope(seq=n, subject=subjects.subject_for(e), event=e, msg_id=f"m{n}")
        for n, e in enumerate(events, start=1)
    ]


def stored(env: Envelope) -> Stored:
    headers = {subjects.MSG_ID_HEADER: env.msg_id}
    if env.seq == 1:  # the job's creation, stored expecting nothing before it
        headers[subjects.EXPECTED_LAST_SUBJECT_SEQ] = "0"
        headers[subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = subjects.job_stream_filter("job_p")
    return Stored(env.seq, env.subject, encode_event(env.event), headers)


async def test_the_fold_process_folds_as_the_projector_does(tmp_path: Path) -> None:
    envelopes = history()
    for name in ("here.db", "there.db"):
        await (await open_read_model(tmp_path / name)).close()
    db = await open_read_model(tmp_path / "here.db")
    try:
        await apply_batch(db, envelopes[:3])
        await apply_batch(db, envelopes[3:], last_seq=9)  # past a quarantined message
    finally:
        await db.close()

    garbage = Stored(5, "tb.flow.job_p.FlowDone", b"{not json")
    writer = await FoldProcess.start(tmp_path / "there.db")
    try:
        await writer.send([stored(env) for env in envelopes[:3]], 3)
        await writer.send([stored(envelopes[3]), garbage], 9)
        writer.finish()
        answers = [answer async for answer in writer.answers()]
    finally:
        await writer.close()
    assert [answer.seq for answer in answers] == [3, 9]
    assert [refused.message for refused in answers[1].refused] == [garbage]
    assert await dump_tables(tmp_path / "there.db") == await dump_tables(tmp_path / "here.db")


async def test_a_rebuild_quarantines_what_is_no_event_and_moves_past_it(
    bus: Bus, tmp_path: Path
) -> None:
    head = await append(bus, job("job_q"))
    for subject, raw in GARBAGE.values():
        await bus.nc.publish(subject, raw)
    await bus.nc.flush()
    tail = await append(bus, ev(JobStarted, job_id="job_q", flows_total=2, allowed_hosts=["x"]))
    assert await rebuild(bus, tmp_path / "read.db") == tail
    records, _ = await list_quarantined(bus.js)
    assert sorted(r.seq for r in records) == list(range(head + 1, tail))
    db = await open_read_model(tmp_path / "read.db")
    try:
        assert await applied_seq(db) == tail
        [(status,)] = await db.execute_fetchall("SELECT status FROM jobs")
        assert status == "running"
    finally:
        await db.close()


async def test_a_fold_that_fails_says_why(tmp_path: Path) -> None:
    writer = await FoldProcess.start(tmp_path / "no-read-model.db")  # no tables in it
    try:
        await writer.send([stored(env) for env in history()], 4)
        with pytest.raises(FoldFailed, match="no such table"):
            async for _ in writer.answers():
                pass
    finally:
        await writer.close()


async def test_a_fold_process_that_dies_is_an_error_not_a_hang(tmp_path: Path) -> None:
    await (await open_read_model(tmp_path / "read.db")).close()
    writer = await FoldProcess.start(tmp_path / "read.db")
    try:
        writer._proc.send_signal(signal.SIGKILL)
        with pytest.raises(FoldFailed, match="exit code -9"):
            async for _ in writer.answers():
                pass
        with pytest.raises(FoldFailed, match="exit code -9"):
            await writer.send([stored(env) for env in history()], 4)
    finally:
        await writer.close()
