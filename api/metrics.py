"""Metrics: the run summary of every job, and ``/metrics`` for Prometheus.

Every number but request latency is read at scrape time from the read model, the
stream, the dispatch consumers or the presence bucket, so it survives a restart of the
API and two replicas agree on it; request latency is this process's own.
"""

from __future__ import annotations

from typing import Any

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

# one bound per doubling: 10 ms, 20 ms, … past a day (the model keeps eight per doubling)
DURATION_BOUNDS = list(range(0, BUCKETS - 1, PER_DOUBLING))


class MetricsController(Controller):
    tags = ["metrics"]
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
    db = services.db
    position = services.projector.position
    last_seq = await services.bus.last_seq()

    events = CounterMetricFamily(
        "tb_events", "Events in the log applied to the read model, by type", labels=["type"]
    )
    for kind, count in await metrics_views.events_by_type(db):
        events.add_metric([kind], count)

    summary = await metrics_views.summary(db, utcnow(), position)
    flows = CounterMetricFamily("tb_flows", "Flows ended, by result", labels=["result"])
    flows.add_metric(["done"], summary.success)
    flows.add_metric(["failed"], summary.fail)
    jobs = GaugeMetricFamily("tb_jobs", "Jobs by status", labels=["status"])
    for status, count in summary.jobs.items():
        jobs.add_metric([status], count)

    found = await metrics_views.histograms(db, EVERY_JOB)
    series, _, total_ms = metrics_views.cumulative(
        "flow_duration_ms", found.get("flow_duration_ms", {}), DURATION_BOUNDS
    )
    count = sum(c for c, _ in found.get("flow_duration_ms", {}).values())
    duration = HistogramMetricFamily(
        "tb_flow_duration_seconds",
        "Session time of flows that ended done",
        buckets=[*((f"{le / 1000:g}", n) for le, n in series), ("+Inf", count)],
        sum_value=total_ms / 1000,
    )

    depth = GaugeMetricFamily(
        "tb_dispatch_queue_depth",
        "Work items waiting in a platform's queue (its dispatch consumer's pending count)",
        labels=["os", "browser"],
    )
    for (os_name, browser), pending in sorted((await dispatch_queue_depths(services.bus)).items()):
        depth.add_metric([os_name, browser], pending)

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

    lag = GaugeMetricFamily(
        "tb_projection_lag_events",
        "Events in the log the read model has not applied (stream last sequence - checkpoint)",
        value=max(last_seq - position, 0),
    )
    seq = GaugeMetricFamily(
        "tb_projection_seq", "The read model's checkpoint (stream sequence)", value=position
    )
    stream = GaugeMetricFamily(
        "tb_stream_last_seq", "The event stream's last sequence", value=last_seq
    )
    return [events, flows, jobs, duration, depth, runners, lag, seq, stream]
