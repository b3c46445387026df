"""Read model of run metrics: flow durations, web vitals, outcomes per minute, events by type.

Distributions are kept as bounded histograms, not as a table of every value: each
(scope, metric) has at most ``BUCKETS`` rows whatever the number of flows, where the
scope is a job id or ``""`` for every job. Bucket ``k`` holds values up to
``base * 2 ** (k / 8)`` (eight buckets per doubling), with their count and sum, so a
mean is exact and a percentile read from the buckets is within 9% of the true value.
Sums are whole numbers of a small unit (``SCALE``): added in any grouping they come out
the same, so a model folded in other batches is equal to the last digit.

What is counted follows the jobs read model: a flow's duration and its outcome minute
are taken when its row in ``flows`` is done or failed (the one flow rule, applied by
``projections.jobs`` first; the row's ``updated_at`` is then the time of the event that
ended it), once per flow. A page's timings count once per flow attempt and page number
(``n``), the key of its message id: a page reported again after the dedupe window is not
counted twice, and pages stored out of order (a publish retried after the next one) all
count. The pages seen of a flow's latest attempt are a bit set, so the timings of its
first ``PAGES_TRACKED`` pages count (a session has at most 50). Everything is folded
once per batch, in a few statements.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal, TypeGuard

import aiosqlite

from projections.db import select_in
from schemas.events import Envelope, Event, FlowDone, FlowFailed, FlowStalled, PageVisited

Metric = Literal["flow_duration_ms", "ttfb_ms", "fcp_ms", "lcp_ms", "cls"]
VITALS: tuple[Metric, ...] = ("ttfb_ms", "fcp_ms", "lcp_ms", "cls")
EVERY_JOB = ""  # the scope of the global histograms
PER_DOUBLING = 8
BUCKETS = 8 * 28  # up to base * 2**28: past a day in ms, and past 1000 for CLS (2.7e5)
BASE: dict[Metric, float] = {
    "flow_duration_ms": 10.0,
    "ttfb_ms": 1.0,
    "fcp_ms": 1.0,
    "lcp_ms": 1.0,
    "cls": 0.0001,
}
SCALE: dict[Metric, int] = {
    "flow_duration_ms": 1,
    "ttfb_ms": 1000,
    "fcp_ms": 1000,
    "lcp_ms": 1000,
    "cls": 1_000_000,
}
MINUTES_KEPT = timedelta(days=1)
PAGES_TRACKED = 62  # bits of a page set that fit a signed 64-bit integer
_ENDS: frozenset[type[Event]] = frozenset({FlowDone, FlowFailed, FlowStalled})

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS metric_histograms (
        scope TEXT NOT NULL,
        metric TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        sum INTEGER NOT NULL,  -- in units of 1 / SCALE[metric]
        PRIMARY KEY (scope, metric, bucket)
    ) WITHOUT ROWID""",
    # per flow: its latest attempt, the pages of it whose timings are counted (bit n for
    # page n), and whether its outcome (duration, minute) is
    """CREATE TABLE IF NOT EXISTS metric_flows (
        flow_id TEXT PRIMARY KEY,
        attempt INTEGER NOT NULL DEFAULT 0,
        pages INTEGER NOT NULL DEFAULT 0,
        settled INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    # flows settled per minute of event time, every job together (the last day's)
    """CREATE TABLE IF NOT EXISTS metric_minutes (
        minute TEXT PRIMARY KEY,
        done INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS metric_events (
        type TEXT PRIMARY KEY,
        count INTEGER NOT NULL
    ) WITHOUT ROWID""",
)
# each table and its key, for comparing two read models
TABLES = {
    "metric_histograms": "scope, metric, bucket",
    "metric_flows": "flow_id",
    "metric_minutes": "minute",
    "metric_events": "type",
}


def bucket_of(metric: Metric, value: float) -> int:
    """The histogram bucket of ``value``: the first whose upper bound holds it."""
    base = BASE[metric]
    if value <= base:
        return 0
    return min(math.ceil(PER_DOUBLING * math.log2(value / base) - 1e-9), BUCKETS - 1)


def upper_bound(metric: Metric, bucket: int) -> float:
    """The largest value bucket ``bucket`` holds (the last one holds everything above)."""
    if bucket >= BUCKETS - 1:
        return math.inf
    return BASE[metric] * 2 ** (bucket / PER_DOUBLING)


class _Deltas:
    """What one batch adds, written in one statement per table."""

    def __init__(self) -> None:
        self.histograms: dict[tuple[str, str, int], list[int]] = {}
        self.minutes: dict[str, list[int]] = {}

    def observe(self, job_id: str, metric: Metric, value: float) -> None:
        bucket, units = bucket_of(metric, value), round(value * SCALE[metric])
        for scope in (job_id, EVERY_JOB):
            row = self.histograms.setdefault((scope, metric, bucket), [0, 0])
            row[0] += 1
            row[1] += units

    def outcome(self, at: str, done: bool) -> None:
        row = self.minutes.setdefault(at[:16], [0, 0])  # YYYY-MM-DDTHH:MM of UTC
        row[0 if done else 1] += 1


async def apply_batch(db: aiosqlite.Connection, batch: Sequence[Envelope]) -> None:
    """Fold a batch's events, after the jobs read model has applied them."""
    events = [env.event for env in batch]
    types = Counter(map(type, events))
    await _count_events(db, types)
    deltas = _Deltas()
    if PageVisited in types:
        visits = [event for event in events if type(event) is PageVisited]
        await _page_timings(db, visits, deltas)
    if not _ENDS.isdisjoint(types):
        ends = {event.flow_id for event in events if _ends_a_flow(event)}
        await _outcomes(db, sorted(ends), deltas)
    await _write(db, deltas)


def _ends_a_flow(event: Event) -> TypeGuard[FlowDone | FlowFailed | FlowStalled]:
    return type(event) in _ENDS  # event classes are final: the type is enough


async def _count_events(db: aiosqlite.Connection, types: Counter[type[Event]]) -> None:
    await db.executemany(
        "INSERT INTO metric_events (type, count) VALUES (?, ?)"
        " ON CONFLICT (type) DO UPDATE SET count = count + excluded.count",
        sorted((kind.__name__, n) for kind, n in types.items()),
    )


async def _page_timings(
    db: aiosqlite.Connection, visits: list[PageVisited], deltas: _Deltas
) -> None:
    """Count each page's timings once per flow attempt (the latest one of the flow)."""
    seen = await select_in(
        db, "SELECT flow_id, attempt, pages FROM metric_flows WHERE flow_id IN ({})",
        sorted({v.flow_id for v in visits}),
    )  # fmt: skip
    state = {flow_id: (attempt, pages) for flow_id, attempt, pages in seen}
    changed: set[str] = set()
    for visit in visits:
        attempt, pages = state.get(visit.flow_id, (0, 0))
        if visit.attempt < attempt or visit.n >= PAGES_TRACKED:
            continue  # a page of an older attempt, or past the pages tracked
        if visit.attempt > attempt:
            attempt, pages = visit.attempt, 0  # a new attempt visits its pages anew
        bit = 1 << visit.n
        if pages & bit:
            continue
        state[visit.flow_id] = (attempt, pages | bit)
        changed.add(visit.flow_id)
        timings = visit.timings
        if timings is None:
            continue
        values: dict[Metric, float | None] = {
            "ttfb_ms": timings.ttfb_ms,
            "fcp_ms": timings.fcp_ms,
            "lcp_ms": timings.lcp_ms,
            "cls": timings.cls,
        }
        for metric, value in values.items():
            if value is not None:
                deltas.observe(visit.job_id, metric, value)
    await db.executemany(
        "INSERT INTO metric_flows (flow_id, attempt, pages) VALUES (?, ?, ?)"
        " ON CONFLICT (flow_id) DO UPDATE SET attempt = excluded.attempt, pages = excluded.pages",
        [(flow_id, *state[flow_id]) for flow_id in sorted(changed)],
    )


async def _outcomes(db: aiosqlite.Connection, flow_ids: list[str], deltas: _Deltas) -> None:
    """Flows the batch ended and not counted yet: their duration and outcome minute."""
    ended = await select_in(
        db,
        "SELECT f.flow_id, f.job_id, f.status, f.duration_ms, f.updated_at FROM flows AS f"
        " LEFT JOIN metric_flows AS m ON m.flow_id = f.flow_id"
        " WHERE f.flow_id IN ({}) AND f.status IN ('done', 'failed')"
        " AND COALESCE(m.settled, 0) = 0",
        flow_ids,
    )
    for _, job_id, status, duration_ms, updated_at in ended:
        if status == "done":
            deltas.observe(job_id, "flow_duration_ms", float(duration_ms))
        deltas.outcome(updated_at, status == "done")
    await db.executemany(
        "INSERT INTO metric_flows (flow_id, settled) VALUES (?, 1)"
        " ON CONFLICT (flow_id) DO UPDATE SET settled = 1",
        [(row[0],) for row in ended],
    )


async def _write(db: aiosqlite.Connection, deltas: _Deltas) -> None:
    await db.executemany(
        "INSERT INTO metric_histograms (scope, metric, bucket, count, sum) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (scope, metric, bucket) DO UPDATE SET count = count + excluded.count,"
        " sum = sum + excluded.sum",
        [(*key, count, units) for key, (count, units) in sorted(deltas.histograms.items())],
    )
    if not deltas.minutes:
        return
    await db.executemany(
        "INSERT INTO metric_minutes (minute, done, failed) VALUES (?, ?, ?)"
        " ON CONFLICT (minute) DO UPDATE SET done = done + excluded.done,"
        " failed = failed + excluded.failed",
        [(minute, done, failed) for minute, (done, failed) in sorted(deltas.minutes.items())],
    )
    # only the last day before the newest minute is kept: whatever the batches, the
    # same minutes remain (the newest only grows)
    [(newest,)] = await db.execute_fetchall("SELECT MAX(minute) FROM metric_minutes")
    try:
        oldest = (datetime.fromisoformat(f"{newest}+00:00") - MINUTES_KEPT).isoformat()[:16]
    except (OverflowError, ValueError):
        return  # a time at the calendar's edge: nothing to drop
    await db.execute("DELETE FROM metric_minutes WHERE minute < ?", (oldest,))
