"""``tb replay --verify`` and ``tb audit replay --job`` as a user runs them, and the
row-by-row comparison under them."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.audit import replay_job
from cli.main import build_parser
from cli.replay import verify_read_model
from engine.bus import Bus
from projections import verify
from projections.db import connect
from projections.projector import Projector
from projections.read_model import apply_batch, open_read_model
from tests.audit_history import history
from tests.conftest import NatsServer

TB = [sys.executable, "-m", "cli.main"]


async def tb_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*TB, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
async def projected(bus: Bus, tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    """The history in the log and folded by a running projector: (read model, last seq)."""
    async with Projector(bus, tmp_path / "read.db") as projector:
        last = await history(bus)
        await projector.wait_for(last, timeout=10)
        yield projector.db_path, last


def tamper(db_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.execute("UPDATE jobs SET flows_done = 7 WHERE job_id = 'job_a'")
        db.execute("DELETE FROM audit WHERE seq = 3")
        db.execute(
            "INSERT INTO flows (flow_id, job_id, status, attempt, updated_at)"
            " VALUES ('forged', 'job_a', 'done', 1, '2026-01-01T00:00:00+00:00')"
        )


async def test_verify_matches_then_names_each_tampered_row_and_column(
    nats_server: NatsServer,
    bus: Bus,
    projected: tuple[Path, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    db_path, last = projected
    assert await verify_read_model(bus, db_path) == 0  # what ``tb replay --verify`` runs
    ok = capsys.readouterr()
    assert f"read model matches the event log at sequence {last}" in ok.out
    assert "verify: rebuild [" in ok.err and "verify: compare [" in ok.err  # progress

    await asyncio.to_thread(tamper, db_path)
    args = ("replay", "--nats-url", nats_server.url, "--db", str(db_path), "--verify")
    bad = await tb_cli(*args)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = bad.stdout
    assert f"read model DIFFERS from the event log at sequence {last}:" in out
    assert "  jobs (job_id): job_a\n" in out
    assert "    job_a: flows_done is 7 in the read model, 2 from the log\n" in out
    assert "  audit (seq): 3\n" in out
    assert "    3: missing from the read model: the log has it\n" in out
    assert "  flows (flow_id): forged\n" in out
    assert "    forged: only in the read model: the log has no such row\n" in out
    assert "runners" not in out and "targets" not in out  # untouched tables match
    assert not Path(f"{db_path}.verify").exists()  # the scratch model is gone


async def test_compare_merges_batches_and_counts_beyond_what_it_shows(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "BATCH", 3)  # every table spans several batches
    await history(bus)
    envelopes = [env async for batch in bus.read(1, follow=False) for env in batch]
    paths = [tmp_path / "a.db", tmp_path / "b.db"]
    for path in paths:
        db = await open_read_model(path)
        await apply_batch(db, envelopes)
        await db.close()
    with contextlib.closing(sqlite3.connect(paths[1])) as db, db:
        db.execute("DELETE FROM audit WHERE seq IN (1, 2, 5, 8, 13, 14)")
        db.execute("UPDATE flows SET clicks_done = 3, runner_id = 'x' WHERE job_id = 'job_b'")
    a, b = await connect(paths[0], readonly=True), await connect(paths[1], readonly=True)
    try:
        rows: list[int] = []
        found = {d.table: d for d in await verify.compare(a, b, show=2, progress=rows.append)}
    finally:
        await a.close()
        await b.close()
    assert sorted(found) == ["audit", "flows"]
    audit = found["audit"]
    assert audit.count == 6 and [r.key for r in audit.shown] == [(1,), (2,)]
    assert all(r.rebuilt is None and r.live is not None for r in audit.shown)
    flows = found["flows"]
    assert flows.count == 3 and flows.key == ["flow_id"]
    assert flows.shown[0].key == ("job_b-f0",)
    assert flows.shown[0].columns == ["runner_id", "clicks_done"]
    assert sum(rows) > 0 and max(rows) <= 3


async def test_audit_replay_prints_the_jobs_timeline_from_the_log(
    nats_server: NatsServer, bus: Bus, capsys: pytest.CaptureFixture[str]
) -> None:
    await history(bus)
    result = await tb_cli("audit", "replay", "--job", "job_b", "--nats-url", nats_server.url)
    assert result.returncode == 0, result.stdout + result.stderr
    header, *lines = result.stdout.splitlines()
    assert header == "job job_b: 8 events from the event log (sequences 8-15)"
    assert [line.split()[3] for line in lines] == [
        "JobCreated", "JobStarted",
        "FlowDispatched", "FlowDone", "FlowDispatched", "FlowDone", "FlowDispatched", "FlowDone",
    ]  # fmt: skip
    assert [int(line.split()[2][1:]) for line in lines] == list(range(8, 16))
    assert lines[0].startswith("2026-03-01 12:03:20.000Z  #8 ")
    assert re.search(r"JobCreated\s+by bob\s+name=job_b targets=\[", lines[0]), lines[0]
    assert re.search(
        r"FlowDone\s+by runner-1\s+flow_id=job_b-f0 attempt=1 runner_id=runner-1", lines[3]
    )
    assert "job_a" not in result.stdout  # another job's work items on the same queue
    assert "reading the event log [" in result.stderr

    assert await replay_job(bus, "job_zzz") == 1  # what the command runs
    assert "no events of job job_zzz in the event log" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["audit", "replay", "--job", "a.b"])
    assert refused.value.code == 2 and "--job: a job id must be" in capsys.readouterr().err


async def test_verify_of_a_file_that_is_no_read_model_says_so(
    bus: Bus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite3.connect(tmp_path / "other.db").close()  # an empty database
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    for name in ("other.db", "junk.db"):
        assert await verify_read_model(bus, tmp_path / name) == 1
        assert f"{tmp_path / name} is not a read model" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.verify*"))
