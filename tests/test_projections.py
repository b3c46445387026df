from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bus import Batch, Bus, Expect
from projections import jobs
from projections.db import connect, iso, set_checkpoint, transaction
from projections.projector import ProjectionUpdate, Projector, ProjectorFailed
from projections.queries import (
    get_consent,
    get_job,
    list_consents,
    list_flows,
    list_jobs,
    list_platforms,
    list_runners,
)
from projections.read_model import CHECKPOINT, applied_seq, apply_batch, open_read_model
from projections.replay import dump_tables, rebuild
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    ConsentRevoked,
    ConsentVerificationFailed,
    DomainClaimed,
    Envelope,
    Event,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    FlowStarted,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobPaused,
    JobRefused,
    JobResumed,
    JobStarted,
    PageVisited,
    RunnerDeregistered,
    RunnerDraining,
    RunnerRegistered,
    TbEvent,
)
from schemas.values import ConsentCaps, JobSettings, Platform, Target

E = TypeVar("E", bound=Event)
T0 = datetime(2025, 1, 1, tzinfo=UTC)
WAIT = 10.0
_ids = itertools.count(1)


def ev(cls: type[E], **fields: Any) -> E:
    """An event with a unique id and a deterministic time."""
    n = next(_ids)
    return cls(id=f"ev{n:06d}", at=T0 + timedelta(seconds=n), actor="test", **fields)


async def append(bus: Bus, *events: TbEvent) -> int:
    seq = 0
    for event in events:
        # a job's creation is stored as its first event, as the job service stores it
        first = isinstance(event, JobCreated)
        expect = Expect(subjects.job_stream_filter(event.job_id), 0) if first else None
        seq = (await bus.append(event, msg_id=event.id, expect=expect)).seq
    return seq


def job(job_id: str, *targets: Target, max_attempts: int = 3) -> JobCreated:
    return ev(
        JobCreated,
        job_id=job_id,
        name=f"name of {job_id}",
        targets=list(targets) or [Target(url="http://site.test/", flows=2, clicks=3)],
        settings=JobSettings(max_attempts=max_attempts, instance_count=4),
    )


def dispatched(job_id: str, flow_id: str, attempt: int = 1, target: int = 0) -> FlowDispatched:
    return ev(
        FlowDispatched,
        job_id=job_id,
        flow_id=flow_id,
        attempt=attempt,
        target_index=target,
        url="http://site.test/",
        clicks=3,
        session_seconds=1.0,
        allowed_hosts=["site.test"],
        seed=1,
    )


def done(job_id: str, flow_id: str, attempt: int = 1, clicks: int = 3) -> FlowDone:
    return ev(
        FlowDone,
        job_id=job_id,
        flow_id=flow_id,
        attempt=attempt,
        runner_id="r1",
        target_index=0,
        clicks_done=clicks,
        duration_ms=1000,
    )


def failed(job_id: str, flow_id: str, attempt: int = 1, *, retryable: bool) -> FlowFailed:
    return ev(
        FlowFailed,
        job_id=job_id,
        flow_id=flow_id,
        attempt=attempt,
        target_index=0,
        reason="timeout",
        retryable=retryable,
        runner_id="r1",
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "read.db"


@pytest.fixture
async def projector(bus: Bus, db_path: Path) -> AsyncIterator[Projector]:
    async with Projector(bus, db_path) as p:
        yield p


@pytest.fixture
async def reader(projector: Projector, db_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    db = await connect(db_path, readonly=True)
    yield db
    await db.close()


async def test_job_rows_follow_the_job_lifecycle(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    created = job(
        "job_1",
        Target(url="http://a.test/", flows=2, clicks=3, label="home"),
        Target(url="http://b.test/", flows=1),
    )
    seq = await append(
        bus,
        created,
        ev(JobStarted, job_id="job_1", flows_total=3, allowed_hosts=["a.test", "b.test"]),
        dispatched("job_1", "f1"),
        ev(FlowStarted, job_id="job_1", flow_id="f1", attempt=1, runner_id="r1"),
        ev(PageVisited, job_id="job_1", flow_id="f1", attempt=1, url="http://a.test/"),
        done("job_1", "f1", clicks=2),
        ev(JobPaused, job_id="job_1"),
    )
    await projector.wait_for(seq, timeout=WAIT)

    view = await get_job(reader, "job_1")
    assert view is not None
    assert (view.status, view.flows_total, view.flows_done, view.flows_failed) == (
        "paused",
        3,
        1,
        0,
    )
    assert view.created_at == created.at and view.started_at is not None
    assert view.finished_at is None
    assert [
        (t.url, t.flow_done, t.flow_target, t.click_done, t.click_target) for t in view.targets
    ] == [
        ("http://a.test/", 1, 2, 2, 6),
        ("http://b.test/", 0, 1, 0, 0),
    ]
    body = msgspec.json.decode(msgspec.json.encode(view))
    assert "reason" not in body
    assert {"job_id", "name", "status", "flows_total", "flows_done", "flows_failed"} <= body.keys()
    assert set(body["targets"][0]) >= {
        "url",
        "flow_done",
        "flow_target",
        "click_done",
        "click_target",
    }
    [flow] = await list_flows(reader, "job_1")
    assert (flow.status, flow.runner_id, flow.clicks_done, flow.target_idx) == ("done", "r1", 2, 0)

    completed = ev(JobCompleted, job_id="job_1", flows_done=1, flows_failed=0)
    seq = await append(bus, ev(JobResumed, job_id="job_1"), completed)
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_1")
    assert view is not None and view.status == "completed"
    assert view.finished_at == completed.at
    assert [j.job_id for j in await list_jobs(reader, status="completed")] == ["job_1"]
    assert await list_jobs(reader, status="running") == []


async def test_refused_job_names_the_hosts(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    seq = await append(
        bus,
        job("job_r"),
        ev(JobRefused, job_id="job_r", reason="no consent", hosts=["evil.test", "other.test"]),
    )
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_r")
    assert view is not None and view.status == "refused"
    assert view.reason == "no consent: evil.test, other.test"
    assert view.finished_at is not None


async def test_duplicate_flow_done_from_two_attempts_counts_once(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    seq = await append(
        bus,
        job("job_d"),
        dispatched("job_d", "f1"),
        done("job_d", "f1", attempt=1, clicks=3),
        done("job_d", "f1", attempt=2, clicks=2),
    )
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_d")
    assert view is not None
    assert (view.flows_done, view.flows_failed, view.clicks_done) == (1, 0, 3)
    assert (view.targets[0].flow_done, view.targets[0].click_done) == (1, 3)


async def test_retryable_failure_then_done_counts_done_once(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    seq = await append(
        bus, job("job_t"), dispatched("job_t", "f1"), failed("job_t", "f1", retryable=True)
    )
    await projector.wait_for(seq, timeout=WAIT)
    [flow] = await list_flows(reader, "job_t")
    assert (flow.status, flow.reason) == ("retrying", "timeout")
    view = await get_job(reader, "job_t")
    assert view is not None and (view.flows_done, view.flows_failed) == (0, 0)

    seq = await append(bus, dispatched("job_t", "f1", attempt=2), done("job_t", "f1", attempt=2))
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_t")
    assert view is not None and (view.flows_done, view.flows_failed) == (1, 0)
    [flow] = await list_flows(reader, "job_t")
    assert (flow.status, flow.attempt, flow.reason) == ("done", 2, None)


async def test_terminal_failure_counts_and_the_first_outcome_stands(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    seq = await append(
        bus,
        job("job_f", Target(url="http://site.test/", flows=3, clicks=1), max_attempts=2),
        failed("job_f", "f1", retryable=False),
        failed("job_f", "f2", attempt=1, retryable=True),
        failed("job_f", "f2", attempt=2, retryable=True),  # the last allowed attempt
        done("job_f", "f3", clicks=1),
        failed("job_f", "f3", attempt=2, retryable=False),  # done never becomes failed
    )
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_f")
    assert view is not None and (view.flows_done, view.flows_failed) == (1, 2)
    assert view.targets[0].flow_failed == 2

    # a late success of a failed flow: the dispatcher already counted it failed, and so
    # does JobCompleted; the read model agrees with both (schemas.flow_lifecycle)
    seq = await append(bus, done("job_f", "f1", clicks=1))
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_f")
    assert view is not None and (view.flows_done, view.flows_failed, view.clicks_done) == (1, 2, 1)
    assert (view.targets[0].flow_done, view.targets[0].flow_failed) == (1, 2)


async def test_a_stalled_attempt_is_spent_and_a_released_one_is_not(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    def stalled(flow_id: str, attempt: int) -> FlowStalled:
        return ev(
            FlowStalled,
            job_id="job_s",
            flow_id=flow_id,
            attempt=attempt,
            target_index=0,
            waited_seconds=600.0,
        )

    def released(flow_id: str, attempt: int) -> FlowReleased:
        return ev(
            FlowReleased,
            job_id="job_s",
            flow_id=flow_id,
            attempt=attempt,
            target_index=0,
            runner_id="r1",
            reason="job paused",
        )

    seq = await append(
        bus,
        job("job_s", Target(url="http://site.test/", flows=2), max_attempts=2),
        dispatched("job_s", "f1", attempt=1),
        stalled("f1", 1),
        dispatched("job_s", "f1", attempt=2),
        stalled("f1", 2),  # the second stall spends the last attempt
        dispatched("job_s", "f2", attempt=1),
        released("f2", 1),
        dispatched("job_s", "f2", attempt=2),
        released("f2", 2),  # released twice: no attempt spent, still waiting
    )
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_s")
    assert view is not None and (view.flows_done, view.flows_failed) == (0, 1)
    flows = {f.flow_id: f for f in await list_flows(reader, "job_s")}
    assert (flows["f1"].status, flows["f1"].attempt) == ("failed", 2)
    assert flows["f1"].reason == "no end reported after 600s"
    assert (flows["f2"].status, flows["f2"].reason) == ("released", "job paused")

    seq = await append(bus, dispatched("job_s", "f2", attempt=3), done("job_s", "f2", attempt=3))
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_s")
    assert view is not None and (view.flows_done, view.flows_failed) == (1, 1)


async def test_nothing_changes_for_a_job_once_it_is_closed(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    seq = await append(
        bus,
        job("job_z", Target(url="http://site.test/", flows=2)),
        ev(JobStarted, job_id="job_z", flows_total=2, allowed_hosts=["site.test"]),
        dispatched("job_z", "f1"),
        dispatched("job_z", "f2"),
        done("job_z", "f1"),
        failed("job_z", "f2", retryable=False),
        ev(JobCompleted, job_id="job_z", flows_done=1, flows_failed=1),
    )
    await projector.wait_for(seq, timeout=WAIT)
    before = await get_job(reader, "job_z")
    assert before is not None and before.status == "completed"
    seq = await append(
        bus,
        dispatched("job_z", "f3"),
        done("job_z", "f3"),
        done("job_z", "f2", attempt=2),
        ev(JobPaused, job_id="job_z", reason="late"),
        ev(JobCancelled, job_id="job_z", reason="late"),
        ev(JobFailed, job_id="job_z", reason="late"),
    )
    await projector.wait_for(seq, timeout=WAIT)
    assert await get_job(reader, "job_z") == before
    assert {f.flow_id for f in await list_flows(reader, "job_z")} == {"f1", "f2"}


async def test_a_refusal_of_a_job_without_a_valid_creation_shows(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    # its JobCreated was quarantined (it did not decode), so only the refusal is an event
    refused = ev(JobRefused, job_id="job_q", reason="JobCreated did not decode", hosts=[])
    seq = await append(bus, refused)
    await projector.wait_for(seq, timeout=WAIT)
    view = await get_job(reader, "job_q")
    assert view is not None
    assert (view.status, view.reason, view.flows_total) == (
        "refused",
        "JobCreated did not decode",
        0,
    )
    assert view.finished_at == refused.at and view.targets == []


async def test_reapplying_applied_envelopes_changes_nothing(
    bus: Bus, projector: Projector, db_path: Path
) -> None:
    seq = await append(
        bus,
        job("job_c"),
        dispatched("job_c", "f1"),
        done("job_c", "f1"),
        failed("job_c", "f2", retryable=False),
    )
    await projector.wait_for(seq, timeout=WAIT)
    await projector.stop()
    before = await dump_tables(db_path)
    history = [env async for batch in bus.read(1, follow=False) for env in batch]

    db = await open_read_model(db_path)
    try:
        assert await apply_batch(db, history) is None  # redelivered after a crash
        assert await apply_batch(db, history[1:3]) is None
        assert await applied_seq(db) == seq
    finally:
        await db.close()
    assert await dump_tables(db_path) == before


async def test_a_failed_batch_leaves_rows_and_checkpoint_untouched(db_path: Path) -> None:
    db = await open_read_model(db_path)
    try:
        envelope = Envelope(seq=1, subject="tb.job.job_x.JobCreated", event=job("job_x"))
        with pytest.raises(RuntimeError):
            async with transaction(db):
                await apply_batch_inside(db, envelope)
                raise RuntimeError("crash between rows and commit")
        assert await applied_seq(db) == 0
        assert await get_job(db, "job_x") is None
        assert (await apply_batch(db, [envelope])) == ProjectionUpdate(seq=1, job_ids={"job_x"})
    finally:
        await db.close()


async def test_times_at_the_edge_of_the_calendar_fold_and_read_back(db_path: Path) -> None:
    # the log can hold these (a timezone is all a time needs); their UTC spelling overflows
    late = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
    early = datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=5)))
    created = msgspec.structs.replace(job("job_t"), at=late)
    given = ev(ConsentGiven, domain="edge.test", evidence="e", expires_at=early)
    db = await open_read_model(db_path)
    try:
        envelopes = [
            Envelope(seq=1, subject="tb.job.job_t.JobCreated", event=created),
            Envelope(seq=2, subject="tb.consent.edge_test.ConsentGiven", event=given),
        ]
        assert (await apply_batch(db, envelopes)) is not None
        view = await get_job(db, "job_t")
        assert view is not None and view.created_at == datetime.max.replace(tzinfo=UTC)
        (consent,) = await list_consents(db)
        assert consent.expires_at == datetime.min.replace(tzinfo=UTC)
    finally:
        await db.close()


OFFSETS = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23))


@given(st.datetimes(timezones=st.none() | st.just(UTC) | st.builds(timezone, OFFSETS)))
def test_event_times_are_stored_as_their_utc_isoformat(at: datetime) -> None:
    utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    try:
        utc = utc.astimezone(UTC)
    except OverflowError:  # no UTC spelling: the calendar's edge
        utc = (datetime.max if at.year > 1 else datetime.min).replace(tzinfo=UTC)
    assert iso(at) == utc.isoformat()


async def test_a_transaction_cancelled_while_it_begins_leaves_none_open(db_path: Path) -> None:
    db = await open_read_model(db_path)
    try:

        async def write() -> None:
            async with transaction(db):
                await set_checkpoint(db, CHECKPOINT, 7)

        task = asyncio.create_task(write())
        # runs after the task's first step, which is waiting on BEGIN IMMEDIATE
        asyncio.get_running_loop().call_soon(task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await applied_seq(db) == 0 and not db.in_transaction
        await write()
        assert await applied_seq(db) == 7
    finally:
        await db.close()


async def apply_batch_inside(db: aiosqlite.Connection, envelope: Envelope) -> None:
    await jobs.apply(db, envelope)
    await set_checkpoint(db, CHECKPOINT, envelope.seq)


async def test_restart_resumes_from_the_checkpoint_without_double_counting(
    bus: Bus, db_path: Path
) -> None:
    async with Projector(bus, db_path) as first:
        seq = await append(bus, job("job_s"), done("job_s", "f1"))
        await first.wait_for(seq, timeout=WAIT)
    seq = await append(bus, done("job_s", "f1", attempt=2), done("job_s", "f2"))
    async with Projector(bus, db_path) as second:
        assert second.position == seq - 2
        await second.wait_for(seq, timeout=WAIT)
        view = await get_job(second.db, "job_s")
    assert view is not None and view.flows_done == 2


async def test_rebuild_from_the_log_equals_the_live_projection(
    bus: Bus, projector: Projector, db_path: Path
) -> None:
    seq = await append(
        bus,
        job("job_a"),
        job("job_b", Target(url="http://b.test/", flows=4, clicks=1)),
        ev(JobStarted, job_id="job_a", flows_total=2, allowed_hosts=["site.test"]),
        dispatched("job_a", "f1"),
        ev(FlowStarted, job_id="job_a", flow_id="f1", attempt=1, runner_id="r1"),
        done("job_a", "f1"),
        done("job_a", "f1", attempt=2),
        failed("job_a", "f2", retryable=True),
        ev(RunnerRegistered, runner_id="r1", platform=Platform(), slots=2, hostname="h"),
        ev(DomainClaimed, domain="site.test", token="tok"),
    )
    await projector.wait_for(seq, timeout=WAIT)
    await projector.stop()
    live = await dump_tables(db_path)
    assert live["jobs"] and live["flows"] and live["runners"] and live["consents"]
    tables_and_indexes = await schema_of(db_path)

    await asyncio.to_thread(db_path.unlink)
    calls: list[tuple[int, int]] = []
    last = await rebuild(bus, db_path, progress=lambda done, total: calls.append((done, total)))
    assert last == seq and calls[-1] == (seq, seq)
    assert await dump_tables(db_path) == live
    # its indexes are made after the rows: the same ones
    assert await schema_of(db_path) == tables_and_indexes

    # rebuilding over an existing model (with its -wal) gives the same rows again
    await rebuild(bus, db_path)
    assert await dump_tables(db_path) == live
    assert not db_path.with_name(f"{db_path.name}.rebuild").exists()


async def schema_of(path: Path) -> list[tuple[object, ...]]:
    db = await connect(path, readonly=True)
    try:
        rows = await db.execute_fetchall(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        )
        return [tuple(row) for row in rows]
    finally:
        await db.close()


async def test_runners_read_model(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    windows = Platform(os="windows", browser="firefox")
    seq = await append(
        bus,
        ev(RunnerRegistered, runner_id="r1", platform=Platform(), slots=2, hostname="h1"),
        ev(RunnerRegistered, runner_id="r2", platform=Platform(), slots=3, version="1.0"),
        ev(RunnerRegistered, runner_id="r3", platform=windows, slots=1),
        ev(RunnerDraining, runner_id="r2"),
        ev(RunnerDeregistered, runner_id="r3", reason="shutdown"),
    )
    await projector.wait_for(seq, timeout=WAIT)
    runners = {r.runner_id: r for r in await list_runners(reader)}
    assert {k: r.status for k, r in runners.items()} == {
        "r1": "registered",
        "r2": "draining",
        "r3": "deregistered",
    }
    assert runners["r3"].reason == "shutdown" and runners["r1"].hostname == "h1"
    [platform] = await list_platforms(reader)
    assert (platform.os, platform.browser, platform.runners, platform.slots) == (
        "linux",
        "chromium",
        2,
        5,
    )


async def test_consents_read_model(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    expires = T0 + timedelta(days=30)
    seq = await append(
        bus,
        ev(DomainClaimed, domain="Site.test", token="tb-123"),
        ev(
            ConsentGiven,
            domain="site.test",
            evidence="https://site.test/.well-known/trafficbuster.txt",
            expires_at=expires,
            caps=ConsentCaps(max_concurrent=5, max_flows_per_minute=60),
        ),
        ev(ConsentVerificationFailed, domain="site.test", reason="HTTP 500"),  # a re-check
        ev(DomainClaimed, domain="gone.test", token="tb-456"),
        ev(ConsentRevoked, domain="gone.test", reason="owner asked"),
    )
    await projector.wait_for(seq, timeout=WAIT)
    site = await get_consent(reader, "SITE.test")
    assert site is not None
    assert (site.status, site.token, site.expires_at, site.max_concurrent) == (
        "verified",
        "tb-123",
        expires,
        5,
    )
    # the one consent rule: a failed re-check leaves a verified domain verified (it says
    # why in reason), and a revocation retires the token
    assert [(c.domain, c.status, c.token, c.reason) for c in await list_consents(reader)] == [
        ("gone.test", "revoked", None, "owner asked"),
        ("site.test", "verified", "tb-123", "HTTP 500"),
    ]


async def test_listeners_hear_which_jobs_changed(bus: Bus, projector: Projector) -> None:
    updates = projector.subscribe()
    seq = await append(
        bus, job("job_l"), ev(RunnerRegistered, runner_id="r9", platform=Platform(), slots=1)
    )
    await projector.wait_for(seq, timeout=WAIT)
    seen = ProjectionUpdate(seq=0)
    while seen.seq < seq:
        update = await asyncio.wait_for(updates.get(), WAIT)
        seen = ProjectionUpdate(
            seq=update.seq,
            job_ids=seen.job_ids | update.job_ids,
            runner_ids=seen.runner_ids | update.runner_ids,
        )
    assert (seen.job_ids, seen.runner_ids) == ({"job_l"}, {"r9"})


async def test_wait_for_a_sequence_not_yet_written_times_out(projector: Projector) -> None:
    with pytest.raises(TimeoutError):
        await projector.wait_for(projector.position + 100, timeout=0.2)
    assert projector.healthy


class FirstReadStalls(Bus):
    """A reader that goes quiet without an error, as an ordered consumer can."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus.nc, bus.config)
        self.reads = 0

    def read_batches(
        self, start_seq: int, stream_filter: str | list[str] | None = None, **kw: Any
    ) -> AsyncGenerator[Batch, None]:
        self.reads += 1
        if self.reads == 1:
            return self._silent()
        return super().read_batches(start_seq, stream_filter, **kw)

    async def _silent(self) -> AsyncGenerator[Batch, None]:
        await asyncio.Event().wait()
        yield Batch([], 0, [])


async def test_a_stalled_reader_is_restarted_from_the_checkpoint(bus: Bus, db_path: Path) -> None:
    stalling = FirstReadStalls(bus)
    async with Projector(stalling, db_path, stall_after=0.3, check_every=0.1) as projector:
        seq = await append(bus, job("job_w"))
        await projector.wait_for(seq, timeout=WAIT)
        assert projector.restarts >= 1 and stalling.reads >= 2
        view = await get_job(projector.db, "job_w")
        assert view is not None and projector.healthy


async def test_an_apply_error_fails_the_projector_loudly(
    bus: Bus, projector: Projector, db_path: Path
) -> None:
    seq = await append(bus, job("job_ok"))
    await projector.wait_for(seq, timeout=WAIT)
    async with aiosqlite.connect(db_path) as other:
        await other.execute("DROP TABLE targets")
        await other.commit()
    seq = await append(bus, job("job_bad"))
    with pytest.raises(ProjectorFailed):
        await projector.wait_for(seq, timeout=WAIT)
    assert not projector.healthy and projector.failure is not None
    assert projector.position == seq - 1
