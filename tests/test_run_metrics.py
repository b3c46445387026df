"""Run metrics folded from the log: durations, web vitals, outcomes, events by type."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import aiosqlite
import msgspec
from hypothesis import given
from hypothesis import strategies as st

from engine.bus import Bus
from projections.metrics_views import (
    distribution,
    events_by_type,
    histograms,
    job_metrics,
    rate_and_eta,
    summary,
)
from projections.projector import Projector
from projections.queries import get_job
from projections.read_model import apply_batch, open_read_model
from projections.replay import dump_tables
from projections.run_metrics import EVERY_JOB, bucket_of, upper_bound
from schemas import subjects
from schemas.events import Envelope, FlowDone, JobStarted, PageTimings, PageVisited
from schemas.values import Target
from tests.test_projections import (
    T0,
    WAIT,
    append,
    db_path,
    dispatched,
    done,
    ev,
    failed,
    job,
    projector,
    reader,
)

__all__ = ["db_path", "projector", "reader"]  # fixtures


def finished(job_id: str, flow_id: str, duration_ms: int, attempt: int = 1) -> FlowDone:
    flow_done = done(job_id, flow_id, attempt, clicks=0)
    return msgspec.structs.replace(flow_done, duration_ms=duration_ms)


def visited(job_id: str, flow_id: str, n: int, attempt: int = 1, **timings: float) -> PageVisited:
    return ev(
        PageVisited,
        job_id=job_id,
        flow_id=flow_id,
        attempt=attempt,
        url="http://site.test/",
        n=n,
        timings=PageTimings(**timings),
    )


@given(st.floats(min_value=0, max_value=8.64e7, allow_nan=False))
def test_a_value_lies_in_the_bucket_it_is_counted_in(value: float) -> None:
    bucket = bucket_of("flow_duration_ms", value)
    assert value <= upper_bound("flow_duration_ms", bucket) * (1 + 1e-9)
    if bucket > 0:
        assert value > upper_bound("flow_duration_ms", bucket - 1) * (1 - 1e-9)


@given(st.lists(st.integers(min_value=0, max_value=3_600_000), min_size=1, max_size=300))
def test_percentiles_from_the_histogram_are_within_nine_percent(values: list[int]) -> None:
    buckets: dict[int, tuple[int, float]] = {}
    for value in values:
        b = bucket_of("flow_duration_ms", value)
        count, total = buckets.get(b, (0, 0.0))
        buckets[b] = (count + 1, total + value)
    d = distribution("flow_duration_ms", buckets)
    ordered = sorted(values)
    assert d.count == len(values)
    assert d.mean is not None and math.isclose(d.mean, sum(values) / len(values), rel_tol=1e-5)
    for q, estimate in ((0.5, d.p50), (0.9, d.p90), (0.99, d.p99)):
        exact = ordered[max(math.ceil(q * len(values)) - 1, 0)]
        bucket = bucket_of("flow_duration_ms", exact)
        lower = upper_bound("flow_duration_ms", bucket - 1) if bucket else 0.0
        # the estimate lies in the bucket of the exact value: within 9% of it
        assert estimate is not None
        upper = upper_bound("flow_duration_ms", bucket)
        assert lower * (1 - 1e-5) <= estimate <= upper * (1 + 1e-5)


async def test_durations_and_vitals_count_each_flow_and_page_once(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    flows = [f"f{i}" for i in range(10)]
    events = [
        job("job_m", Target(url="http://site.test/", flows=12, clicks=0)),
        ev(JobStarted, job_id="job_m", flows_total=12, allowed_hosts=["site.test"]),
    ]
    for i, flow_id in enumerate(flows):
        events.append(dispatched("job_m", flow_id))
        events.append(
            visited("job_m", flow_id, 0, ttfb_ms=100 + i, fcp_ms=200, lcp_ms=400, cls=0.1)
        )
        events.append(finished("job_m", flow_id, duration_ms=1000 * (i + 1)))
    # reported again after the dedupe window (new event ids, same flow, attempt and n)
    events.append(visited("job_m", "f0", 0, ttfb_ms=5000))
    # stored out of order (the publish of page 1 retried after page 2's): both count
    events += [visited("job_m", "f1", 2, fcp_ms=200), visited("job_m", "f1", 1, fcp_ms=200)]
    events.append(visited("job_m", "f2", 100_000, fcp_ms=200))  # past the pages tracked
    events.append(finished("job_m", "f0", duration_ms=99_000))
    # a failure that is retried is no outcome yet; one that is not is
    events += [dispatched("job_m", "g1"), failed("job_m", "g1", retryable=True)]
    events += [dispatched("job_m", "g2"), failed("job_m", "g2", retryable=False)]
    seq = await append(bus, *events)
    await projector.wait_for(seq, timeout=WAIT)

    view = await get_job(reader, "job_m")
    assert view is not None and (view.flows_done, view.flows_failed) == (10, 1)
    m = await job_metrics(
        reader,
        "job_m",
        status=view.status,
        total=view.flows_total,
        success=view.flows_done,
        fail=view.flows_failed,
        started_at=view.started_at,
        finished_at=view.finished_at,
        now=T0 + timedelta(hours=1),
    )
    assert (m.success, m.fail, m.total, m.success_ratio) == (10, 1, 12, float(f"{10 / 11:.6g}"))
    assert m.queued == 1  # g1 waits for its retry
    d = m.flow_duration_ms
    assert d.count == 10 and d.mean == 5500.0  # the 99 s report of f0 is not counted
    assert d.p50 is not None and 5000 * 0.91 <= d.p50 <= 5000 * 1.1
    assert d.p99 is not None and 10_000 * 0.91 <= d.p99 <= 10_000 * 1.1
    vitals = m.web_vitals
    assert vitals.ttfb_ms.count == 10 and vitals.ttfb_ms.mean == 104.5
    assert vitals.fcp_ms.count == 12
    assert vitals.cls.count == 10 and vitals.cls.mean is not None
    assert math.isclose(vitals.cls.mean, 0.1)
    assert vitals.lcp_ms.p75 is not None and 400 * 0.91 <= vitals.lcp_ms.p75 <= 400 * 1.1

    everything = await summary(reader, T0 + timedelta(minutes=1), projector.position)
    assert (everything.success, everything.fail, everything.flows_total) == (10, 1, 12)
    assert everything.flow_duration_ms == d
    assert everything.jobs == {"running": 1}
    counts = dict(await events_by_type(reader))
    assert counts["FlowDone"] == 11 and counts["PageVisited"] == 14 and counts["JobCreated"] == 1
    assert sum(counts.values()) == len(events)


async def test_outcomes_per_minute_give_the_recent_rate(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection
) -> None:
    events = [job("job_r", Target(url="http://site.test/", flows=30, clicks=0))]
    events.append(ev(JobStarted, job_id="job_r", flows_total=30, allowed_hosts=["site.test"]))
    for i in range(30):
        events += [dispatched("job_r", f"r{i}"), finished("job_r", f"r{i}", duration_ms=10)]
    seq = await append(bus, *events)
    await projector.wait_for(seq, timeout=WAIT)
    last = events[-1].at
    assert (await summary(reader, last, seq)).rate_per_second == 0.1
    assert (await summary(reader, last + timedelta(hours=1), seq)).rate_per_second == 0


def test_rate_and_eta_follow_the_run_so_far() -> None:
    rate, eta = rate_and_eta(
        status="running", total=100, ended=25, started_at=T0, finished_at=None,
        now=T0 + timedelta(seconds=50),
    )  # fmt: skip
    assert (rate, eta) == (0.5, 150.0)
    rate, eta = rate_and_eta(
        status="completed", total=100, ended=100, started_at=T0,
        finished_at=T0 + timedelta(seconds=200), now=T0 + timedelta(days=1),
    )  # fmt: skip
    assert (rate, eta) == (0.5, None)


async def test_the_metrics_tables_rebuild_alike(
    bus: Bus, projector: Projector, reader: aiosqlite.Connection, tmp_path: Path
) -> None:
    events = [job("job_b"), ev(JobStarted, job_id="job_b", flows_total=2, allowed_hosts=["x"])]
    events += [dispatched("job_b", "b1"), visited("job_b", "b1", 0, ttfb_ms=12.5)]
    events += [finished("job_b", "b1", duration_ms=1234)]
    seq = await append(bus, *events)
    await projector.wait_for(seq, timeout=WAIT)
    assert (await histograms(reader, EVERY_JOB))["flow_duration_ms"]
    async with Projector(bus, tmp_path / "again.db") as again:
        await again.wait_for(seq, timeout=WAIT)
    first = await dump_tables(projector.db_path)
    second = await dump_tables(tmp_path / "again.db")
    for table in ("metric_histograms", "metric_flows", "metric_minutes", "metric_events"):
        assert first[table] == second[table], table


async def test_folded_one_by_one_or_all_at_once_the_metrics_are_equal(tmp_path: Path) -> None:
    events = [job("job_f", Target(url="http://site.test/", flows=40, clicks=0))]
    events.append(ev(JobStarted, job_id="job_f", flows_total=40, allowed_hosts=["site.test"]))
    for i in range(40):
        flow_id = f"k{i}"
        events.append(dispatched("job_f", flow_id))
        timings = {"ttfb_ms": 0.1 * i + 0.7, "lcp_ms": 1234.5678 / (i + 1), "cls": 0.0001 * i}
        events += [visited("job_f", flow_id, 0, **timings), visited("job_f", flow_id, 0)]
        if i % 3:
            events.append(finished("job_f", flow_id, duration_ms=37 * i))
        else:
            events.append(failed("job_f", flow_id, retryable=False))
    # outcomes a day and more apart: the older minutes are dropped whatever the batches
    late = msgspec.structs.replace(finished("job_f", "k1", 5), at=T0 + timedelta(days=2))
    events += [dispatched("job_f", "late"), msgspec.structs.replace(late, flow_id="late")]
    envelopes = [
        Envelope(seq=n, subject=subjects.subject_for(e), event=e)
        for n, e in enumerate(events, start=1)
    ]
    for name, size in (("one.db", 1), ("all.db", len(envelopes)), ("some.db", 7)):
        db = await open_read_model(tmp_path / name)
        try:
            for start in range(0, len(envelopes), size):
                await apply_batch(db, envelopes[start : start + size])
        finally:
            await db.close()
    dumps = [await dump_tables(tmp_path / n) for n in ("one.db", "all.db", "some.db")]
    assert dumps[0]["metric_minutes"] and dumps[0]["metric_histograms"]
    assert all(d == dumps[0] for d in dumps)
    kept = min(row[0] for row in dumps[0]["metric_minutes"])
    assert kept >= (T0 + timedelta(days=1)).isoformat()[:16]
