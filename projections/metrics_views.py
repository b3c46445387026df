"""Reads of the run metrics: per job, for every job, and what ``/metrics`` exposes.

Rates and ETAs depend on the time of the read (``now``); every count comes from the
read model, so two API replicas at the same checkpoint answer the same counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import aiosqlite
import msgspec

from projections.db import iso
from projections.run_metrics import EVERY_JOB, SCALE, VITALS, Metric, upper_bound
from schemas.values import JobStatus

QUANTILES = (0.5, 0.75, 0.9, 0.99)
RATE_WINDOW = timedelta(minutes=5)


class Distribution(msgspec.Struct, kw_only=True):
    """``count`` values, their ``mean``, and percentiles estimated from a histogram with
    eight buckets per doubling (within 9% of the exact value); ``None`` without values."""

    count: int
    mean: float | None
    p50: float | None
    p75: float | None
    p90: float | None
    p99: float | None


class WebVitals(msgspec.Struct, kw_only=True):
    """From the timings of ``PageVisited`` (the page on arrival): milliseconds, CLS unitless."""

    ttfb_ms: Distribution
    fcp_ms: Distribution
    lcp_ms: Distribution
    cls: Distribution


class RunMetrics(msgspec.Struct, kw_only=True):
    """One job's run: ``queued`` flows wait for a runner (or for their next attempt),
    ``running`` ones are on a runner; ``rate_per_second`` is flows ended per second since
    it started (until it finished); ``eta_seconds`` the time left at that rate, while it
    runs."""

    total: int
    success: int
    fail: int
    queued: int
    running: int
    success_ratio: float | None
    rate_per_second: float | None
    eta_seconds: float | None
    flow_duration_ms: Distribution
    web_vitals: WebVitals


class MetricsSummary(msgspec.Struct, kw_only=True):
    """Every job together: ``rate_per_second`` is flows ended per second over the last
    ``rate_window_seconds`` of wall time."""

    jobs: dict[str, int]  # by status
    flows_total: int
    success: int
    fail: int
    success_ratio: float | None
    rate_per_second: float
    rate_window_seconds: float
    flow_duration_ms: Distribution
    web_vitals: WebVitals
    projection_seq: int


Buckets = dict[int, tuple[int, float]]  # bucket -> (count, sum)


def distribution(metric: Metric, buckets: Buckets) -> Distribution:
    count = sum(c for c, _ in buckets.values())
    if count == 0:
        return Distribution(count=0, mean=None, p50=None, p75=None, p90=None, p99=None)
    total = sum(s for _, s in buckets.values())
    p50, p75, p90, p99 = (quantile(metric, buckets, count, q) for q in QUANTILES)
    return Distribution(count=count, mean=_round(total / count), p50=p50, p75=p75, p90=p90, p99=p99)


def quantile(metric: Metric, buckets: Buckets, count: int, q: float) -> float:
    """Interpolated inside the bucket that holds the ``q``-th value, as Prometheus'
    ``histogram_quantile`` does; the open last bucket answers its values' mean."""
    rank, seen = q * count, 0
    for bucket in sorted(buckets):
        n, total = buckets[bucket]
        if n and seen + n >= rank:
            upper = upper_bound(metric, bucket)
            lower = upper_bound(metric, bucket - 1) if bucket > 0 else 0.0
            if upper == float("inf"):
                return _round(total / n)
            return _round(lower + (upper - lower) * (rank - seen) / n)
        seen += n
    raise AssertionError("rank beyond the count")


def _round(value: float) -> float:
    """Six significant digits: a rate of a flow a day stays visible."""
    return float(f"{value:.6g}")


async def histograms(db: aiosqlite.Connection, scope: str) -> dict[str, Buckets]:
    found: dict[str, Buckets] = {}
    async with db.execute(
        "SELECT metric, bucket, count, sum FROM metric_histograms WHERE scope = ?", (scope,)
    ) as cur:
        for metric, bucket, count, units in await cur.fetchall():
            found.setdefault(metric, {})[bucket] = (count, units / SCALE[metric])
    return found


def _vitals(found: dict[str, Buckets]) -> WebVitals:
    d = {metric: distribution(metric, found.get(metric, {})) for metric in VITALS}
    return WebVitals(ttfb_ms=d["ttfb_ms"], fcp_ms=d["fcp_ms"], lcp_ms=d["lcp_ms"], cls=d["cls"])


def rate_and_eta(
    *,
    status: str,
    total: int,
    ended: int,
    started_at: datetime | None,
    finished_at: datetime | None,
    now: datetime,
) -> tuple[float | None, float | None]:
    """Flows ended per second since the start, and the seconds left at that rate."""
    if started_at is None or ended == 0:
        return None, None
    elapsed = ((finished_at or now) - started_at).total_seconds()
    if elapsed <= 0:
        return None, None
    rate = ended / elapsed
    eta = (total - ended) / rate if status == JobStatus.RUNNING else None
    return _round(rate), None if eta is None else round(eta, 1)


async def job_metrics(
    db: aiosqlite.Connection,
    job_id: str,
    *,
    status: str,
    total: int,
    success: int,
    fail: int,
    started_at: datetime | None,
    finished_at: datetime | None,
    now: datetime,
) -> RunMetrics:
    found = await histograms(db, job_id)
    in_flight: dict[int, int] = dict(
        await db.execute_fetchall(  # type: ignore[arg-type]
            "SELECT status = 'running', COUNT(*) FROM flows WHERE job_id = ?"
            " AND status IN ('queued', 'retrying', 'released', 'running') GROUP BY 1",
            (job_id,),
        )
    )
    ended = success + fail
    rate, eta = rate_and_eta(
        status=status,
        total=total,
        ended=ended,
        started_at=started_at,
        finished_at=finished_at,
        now=now,
    )
    return RunMetrics(
        total=total,
        success=success,
        fail=fail,
        queued=int(in_flight.get(0, 0)),
        running=int(in_flight.get(1, 0)),
        success_ratio=_round(success / ended) if ended else None,
        rate_per_second=rate,
        eta_seconds=eta,
        flow_duration_ms=distribution("flow_duration_ms", found.get("flow_duration_ms", {})),
        web_vitals=_vitals(found),
    )


async def summary(db: aiosqlite.Connection, now: datetime, projection_seq: int) -> MetricsSummary:
    jobs = {
        str(status): int(n)
        for status, n in await db.execute_fetchall(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status"
        )
    }
    [(flows_total, success, fail)] = await db.execute_fetchall(
        "SELECT COALESCE(SUM(flows_total), 0), COALESCE(SUM(flows_done), 0),"
        " COALESCE(SUM(flows_failed), 0) FROM jobs"
    )
    since = iso(now - RATE_WINDOW)[:16]
    [(recent,)] = await db.execute_fetchall(
        "SELECT COALESCE(SUM(done + failed), 0) FROM metric_minutes WHERE minute >= ?", (since,)
    )
    found = await histograms(db, EVERY_JOB)
    ended = int(success) + int(fail)
    return MetricsSummary(
        jobs=jobs,
        flows_total=int(flows_total),
        success=int(success),
        fail=int(fail),
        success_ratio=_round(success / ended) if ended else None,
        rate_per_second=_round(int(recent) / RATE_WINDOW.total_seconds()),
        rate_window_seconds=RATE_WINDOW.total_seconds(),
        flow_duration_ms=distribution("flow_duration_ms", found.get("flow_duration_ms", {})),
        web_vitals=_vitals(found),
        projection_seq=projection_seq,
    )


async def events_by_type(db: aiosqlite.Connection) -> list[tuple[str, int]]:
    return [
        (str(kind), int(n))
        for kind, n in await db.execute_fetchall(
            "SELECT type, count FROM metric_events ORDER BY type"
        )
    ]


def cumulative(
    metric: Metric, buckets: Buckets, bounds: Sequence[int]
) -> tuple[list[tuple[float, int]], int, float]:
    """Cumulative counts at the upper bounds of ``bounds`` (bucket numbers, ascending),
    the total count and the sum: a Prometheus histogram's ``le`` series."""
    series: list[tuple[float, int]] = []
    for bound in bounds:
        n = sum(c for b, (c, _) in buckets.items() if b <= bound)
        series.append((upper_bound(metric, bound), n))
    count = sum(c for c, _ in buckets.values())
    total = sum(s for _, s in buckets.values())
    return series, count, total
