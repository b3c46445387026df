"""Metrics: the run summary of every job, and ``/metrics`` for Prometheus.

Every number but request latency is read at scrape time from the read model, the
stream, the dispatch consumers or the presence bucket, so it survives a restart of the
API and two replicas agree on it; request latency is this process's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import structlog
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency, Provide
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from api.authz import access
from api.deps import services_from_state
from api.openapi import problems
from api.request_latency import RequestLatency
from api.services import Services
from engine.presence import online_runners
from engine.queues import dispatch_queue_depths
from projections import metrics_views
from projections.metrics_views import MetricsSummary
from projections.run_metrics import BUCKETS, EVERY_JOB, PER_DOUBLING
from schemas.ids import utcnow

log = structlog.get_logger("tb.api")
SOURCE_TIMEOUT = 2.0  # seconds: a scrape answers well within Prometheus' 10 s

# one bound per doubling: 10 ms, 20 ms, … past a day (the model keeps eight per doubling)
DURATION_BOUNDS = list(range(0, BUCKETS - 1, PER_DOUBLING))


class MetricsController(Controller):
    tags = ["metrics"]
    opt = access("viewer")
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/api/v1/metrics/summary",
        summary="Every job's run together: outcomes, rate, flow durations, web vitals",
        responses=problems(503),
    )
    async def metrics_summary(self, services: NamedDependency[Services]) -> MetricsSummary:
        return await metrics_views.summary(services.db, utcnow(), services.projector.position)

    @get(
        "/metrics",
        summary="Prometheus text exposition",
        media_type=CONTENT_TYPE_PLAIN_0_0_4,
        responses=problems(503),
    )
    async def prometheus(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        families = await scrape(services)
        latency: RequestLatency = request.app.state.request_latency
        body = generate_latest(_Snapshot(families)) + generate_latest(latency.registry)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


class _Snapshot(Collector):
    """Families read once for this scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def scrape(services: Services) -> list[Metric]:
    """Every family; one whose source cannot be read now (NATS down or slow) is left out
    and ``tb_metrics_source_up`` says which, so a scrape never fails as a whole."""
    families = await _read_model(services)
    up = GaugeMetricFamily(
        "tb_metrics_source_up", "Whether a source of these metrics could be read", labels=["source"]
    )
    sources = {"stream": _stream, "dispatch_queues": _queues, "presence": _presence}
    read = await asyncio.gather(*(_bounded(services, f) for f in sources.values()))
    for source, found in zip(sources, read, strict=True):
        up.add_metric([source], 0 if found is None else 1)
        families += found or []
    return [*families, up]


async def _bounded(
    services: Services, read: Callable[[Services], Awaitable[list[Metric]]]
) -> list[Metric] | None:
    """What ``read`` found, or None when NATS did not answer within ``SOURCE_TIMEOUT``."""
    try:
        async with asyncio.timeout(SOURCE_TIMEOUT):
            return await read(services)
    except (nats.errors.Error, TimeoutError) as err:
        log.warning("metrics.source_unavailable", source=read.__name__, error=repr(err))
        return None


async def _read_model(services: Services) -> list[Metric]:
    db = services.db
    events = CounterMetricFamily(
        "tb_events", "Events in the log applied to the read model, by type", labels=["type"]
    )
    for kind, count in await metrics_views.events_by_type(db):
        events.add_metric([kind], count)

    summary = await metrics_views.summary(db, utcnow(), services.projector.position)
    flows = CounterMetricFamily("tb_flows", "Flows ended, by result", labels=["result"])
    flows.add_metric(["done"], summary.success)
    flows.add_metric(["failed"], summary.fail)
    jobs = GaugeMetricFamily("tb_jobs", "Jobs by status", labels=["status"])
    for status, count in summary.jobs.items():
        jobs.add_metric([status], count)

    found = (await metrics_views.histograms(db, EVERY_JOB)).get("flow_duration_ms", {})
    series, count, total_ms = metrics_views.cumulative("flow_duration_ms", found, DURATION_BOUNDS)
    duration = HistogramMetricFamily(
        "tb_flow_duration_seconds",
        "Session time of flows that ended done",
        buckets=[*((f"{le / 1000:g}", n) for le, n in series), ("+Inf", count)],
        sum_value=total_ms / 1000,
    )
    seq = GaugeMetricFamily(
        "tb_projection_seq",
        "The read model's checkpoint (stream sequence)",
        value=services.projector.position,
    )
    return [events, flows, jobs, duration, seq]


async def _stream(services: Services) -> list[Metric]:
    last_seq = await services.bus.last_seq()
    lag = GaugeMetricFamily(
        "tb_projection_lag_events",
        "Events in the log the read model has not applied (stream last sequence - checkpoint)",
        value=max(last_seq - services.projector.position, 0),
    )
    stream = GaugeMetricFamily(
        "tb_stream_last_seq", "The event stream's last sequence", value=last_seq
    )
    return [lag, stream]


async def _queues(services: Services) -> list[Metric]:
    depth = GaugeMetricFamily(
        "tb_dispatch_queue_depth",
        "Work items waiting in a platform's queue (its dispatch consumer's pending count)",
        labels=["os", "browser"],
    )
    for (os_name, browser), pending in sorted((await dispatch_queue_depths(services.bus)).items()):
        depth.add_metric([os_name, browser], pending)
    return [depth]


async def _presence(services: Services) -> list[Metric]:
    online: dict[tuple[str, str], int] = {}
    for runner in await online_runners(services.bus):
        if runner.status == "online":
            online[(runner.os, runner.browser)] = online.get((runner.os, runner.browser), 0) + 1
    runners = GaugeMetricFamily(
        "tb_runners_online",
        "Runners present and taking work, by platform",
        labels=["os", "browser"],
    )
    for (os_name, browser), n in sorted(online.items()):
        runners.add_metric([os_name, browser], n)
    return [runners]
