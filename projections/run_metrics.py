"""Read model of run metrics: flow durations, web vitals, outcomes per minute, events by type.

Distributions are kept as bounded histograms, not as a table of every value: each
(scope, metric) has at most ``BUCKETS`` rows whatever the number of flows, where the
scope is a job id or ``""`` for every job. Bucket ``k`` holds values up to
``base * 2 ** (k / 8)`` (eight buckets per doubling), with their count and sum, so a
mean is exact and a percentile read from the buckets is within 9% of the true value.

What is counted follows the jobs read model: a flow's duration and its outcome minute
are taken when its row in ``flows`` becomes done or failed (the one flow rule, applied
by ``projections.jobs`` just before), once per flow. A page's timings count once per
flow attempt and page number (``n``), the key of its message id: a page reported again
after the dedupe window is not counted twice.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

import aiosqlite

from projections.db import iso
from schemas.events import Envelope, FlowDone, FlowFailed, FlowStalled, PageVisited

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
MINUTES_KEPT = timedelta(days=1)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS metric_histograms (
        scope TEXT NOT NULL,
        metric TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        sum REAL NOT NULL,
        PRIMARY KEY (scope, metric, bucket)
    ) WITHOUT ROWID""",
    # per flow: the attempt and page count whose timings are counted, and whether its
    # outcome (duration, minute) is
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


async def apply(db: aiosqlite.Connection, env: Envelope) -> None:
    """Fold one flow event, after ``projections.jobs`` has applied it."""
    event = env.event
    match event:
        case PageVisited(timings=timings) if timings is not None:
            if await _first_report(db, event):
                values = {
                    "ttfb_ms": timings.ttfb_ms,
                    "fcp_ms": timings.fcp_ms,
                    "lcp_ms": timings.lcp_ms,
                    "cls": timings.cls,
                }
                for metric, value in values.items():
                    if value is not None:
                        await _observe(db, event.job_id, metric, value)  # type: ignore[arg-type]
        case FlowDone() | FlowFailed() | FlowStalled():
            await _settle(db, event)


async def count_events(db: aiosqlite.Connection, types: Iterable[str]) -> None:
    """Add a batch's events to the counts by type."""
    await db.executemany(
        "INSERT INTO metric_events (type, count) VALUES (?, ?)"
        " ON CONFLICT (type) DO UPDATE SET count = count + excluded.count",
        sorted(Counter(types).items()),
    )


async def _first_report(db: aiosqlite.Connection, event: PageVisited) -> bool:
    """Whether this page of this attempt is new: a runner reports a flow's pages in order,
    so one numbered below the pages already counted was counted."""
    rows = list(
        await db.execute_fetchall(
            "SELECT attempt, pages FROM metric_flows WHERE flow_id = ?", (event.flow_id,)
        )
    )
    if rows:
        attempt, pages = rows[0]
        if event.attempt < attempt or (event.attempt == attempt and event.n < pages):
            return False
    await db.execute(
        "INSERT INTO metric_flows (flow_id, attempt, pages) VALUES (?, ?, ?)"
        " ON CONFLICT (flow_id) DO UPDATE SET attempt = excluded.attempt, pages = excluded.pages",
        (event.flow_id, event.attempt, event.n + 1),
    )
    return True


async def _settle(db: aiosqlite.Connection, event: FlowDone | FlowFailed | FlowStalled) -> None:
    rows = list(
        await db.execute_fetchall(
            "SELECT f.status, f.duration_ms, m.settled FROM flows AS f"
            " LEFT JOIN metric_flows AS m ON m.flow_id = f.flow_id WHERE f.flow_id = ?",
            (event.flow_id,),
        )
    )
    if not rows:
        return
    status, duration_ms, settled = rows[0]
    if settled or status not in ("done", "failed"):
        return  # counted already, or the event did not end the flow (a retry follows)
    await db.execute(
        "INSERT INTO metric_flows (flow_id, settled) VALUES (?, 1)"
        " ON CONFLICT (flow_id) DO UPDATE SET settled = 1",
        (event.flow_id,),
    )
    done = status == "done"
    if done:
        await _observe(db, event.job_id, "flow_duration_ms", float(duration_ms))
    minute = iso(event.at)[:16]  # YYYY-MM-DDTHH:MM of UTC
    await db.execute(
        "INSERT INTO metric_minutes (minute, done, failed) VALUES (?, ?, ?)"
        " ON CONFLICT (minute) DO UPDATE SET done = done + excluded.done,"
        " failed = failed + excluded.failed",
        (minute, int(done), int(not done)),
    )
    try:
        oldest = (datetime.fromisoformat(iso(event.at)) - MINUTES_KEPT).isoformat()[:16]
    except OverflowError:
        return  # a time at the calendar's first day: nothing is older
    await db.execute("DELETE FROM metric_minutes WHERE minute < ?", (oldest,))


async def _observe(db: aiosqlite.Connection, job_id: str, metric: Metric, value: float) -> None:
    bucket = bucket_of(metric, value)
    await db.executemany(
        "INSERT INTO metric_histograms (scope, metric, bucket, count, sum) VALUES (?, ?, ?, 1, ?)"
        " ON CONFLICT (scope, metric, bucket) DO UPDATE SET count = count + 1,"
        " sum = sum + excluded.sum",
        [(scope, metric, bucket, value) for scope in (job_id, EVERY_JOB)],
    )
