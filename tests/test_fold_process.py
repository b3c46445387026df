"""A rebuild's fold runs in a process of its own: it folds as the projector does, and a
fold that fails or dies is an error of the rebuild, never a hang."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from projections.fold_process import FoldFailed, FoldProcess
from projections.read_model import apply_batch, open_read_model
from projections.replay import dump_tables
from schemas import subjects
from schemas.events import Envelope, JobStarted, TbEvent
from tests.test_projections import dispatched, done, ev, job


def envelopes() -> list[Envelope]:
    events: list[TbEvent] = [
        job("job_p"),
        ev(JobStarted, job_id="job_p", flows_total=2, allowed_hosts=["site.test"]),
        dispatched("job_p", "f1"),
        done("job_p", "f1"),
    ]
    return [
        Envelope(seq=n, subject=subjects.subject_for(e), event=e)
        for n, e in enumerate(events, start=1)
    ]


async def test_the_fold_process_folds_as_the_projector_does(tmp_path: Path) -> None:
    history = envelopes()
    for name in ("here.db", "there.db"):
        await (await open_read_model(tmp_path / name)).close()
    db = await open_read_model(tmp_path / "here.db")
    try:
        await apply_batch(db, history[:3])
        await apply_batch(db, history[3:], last_seq=9)  # past a quarantined message
    finally:
        await db.close()

    writer = await FoldProcess.start(tmp_path / "there.db")
    try:
        await writer.send(history[:3], 3)
        await writer.send(history[3:], 9)
        writer.finish()
        assert [seq async for seq in writer.answers()] == [3, 9]
    finally:
        await writer.close()
    assert await dump_tables(tmp_path / "there.db") == await dump_tables(tmp_path / "here.db")


async def test_a_fold_that_fails_says_why(tmp_path: Path) -> None:
    writer = await FoldProcess.start(tmp_path / "no-read-model.db")  # no tables in it
    try:
        await writer.send(envelopes(), 4)
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
            await writer.send(envelopes(), 4)
    finally:
        await writer.close()
