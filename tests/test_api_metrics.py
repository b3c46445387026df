"""Run metrics over HTTP: a job's ``metrics``, the summary, ``/metrics`` and ``/readyz``."""

from __future__ import annotations

import time

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.bus import Bus
from schemas.events import JobStarted
from schemas.values import Target
from tests.api_client import client, put_presence
from tests.conftest import NatsServer
from tests.test_projections import append, dispatched, ev, job
from tests.test_run_metrics import finished, visited

__all__ = ["client"]  # fixtures


async def a_run(bus: Bus) -> int:
    """job_m: 4 flows, 3 done (1, 2 and 3 s) with page timings, 1 still queued."""
    events = [
        job("job_m", Target(url="http://site.test/", flows=4, clicks=0)),
        ev(JobStarted, job_id="job_m", flows_total=4, allowed_hosts=["site.test"]),
    ]
    for i in range(3):
        events.append(dispatched("job_m", f"m{i}"))
        events.append(visited("job_m", f"m{i}", 0, ttfb_ms=50, fcp_ms=100, lcp_ms=300, cls=0.05))
        events.append(finished("job_m", f"m{i}", duration_ms=1000 * (i + 1)))
    events.append(dispatched("job_m", "m3"))
    return await append(bus, *events)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by Prometheus' own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_a_job_reads_with_its_run_metrics_and_the_summary_adds_up(
    client: AsyncTestClient, bus: Bus
) -> None:
    seq = await a_run(bus)
    r = await client.get("/api/v1/jobs/job_m", headers={"TB-Min-Seq": str(seq)})
    assert r.status_code == 200, r.text
    m = r.json()["metrics"]
    assert (m["total"], m["success"], m["fail"], m["queued"], m["running"]) == (4, 3, 0, 1, 0)
    assert m["success_ratio"] == 1.0 and m["rate_per_second"] > 0 and m["eta_seconds"] > 0
    assert m["flow_duration_ms"]["count"] == 3 and m["flow_duration_ms"]["mean"] == 2000
    assert 1800 <= m["flow_duration_ms"]["p50"] <= 2200
    vitals = m["web_vitals"]
    assert {k: vitals[k]["count"] for k in ("ttfb_ms", "fcp_ms", "lcp_ms", "cls")} == {
        "ttfb_ms": 3,
        "fcp_ms": 3,
        "lcp_ms": 3,
        "cls": 3,
    }
    assert vitals["lcp_ms"]["mean"] == 300 and vitals["cls"]["mean"] == 0.05
    listed = (await client.get("/api/v1/jobs")).json()
    assert "metrics" not in listed[0]  # a list stays cheap: metrics are per job

    s = (await client.get("/api/v1/metrics/summary")).json()
    assert (s["flows_total"], s["success"], s["fail"], s["jobs"]) == (4, 3, 0, {"running": 1})
    assert s["flow_duration_ms"] == m["flow_duration_ms"]
    assert s["projection_seq"] >= seq


async def test_prometheus_exposition_reads_the_model_the_queues_and_presence(
    client: AsyncTestClient, bus: Bus
) -> None:
    await bus.ensure_dispatch_consumer("linux", "chromium")
    await put_presence(bus, "linux")
    seq = await a_run(bus)
    assert (await client.get(f"/api/v1/jobs/job_m?min_seq={seq}")).status_code == 200
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert got[("tb_events_total", (("type", "FlowDone"),))] == 3
    assert got[("tb_events_total", (("type", "FlowDispatched"),))] == 4
    assert got[("tb_flows_total", (("result", "done"),))] == 3
    assert got[("tb_flows_total", (("result", "failed"),))] == 0
    assert got[("tb_jobs", (("status", "running"),))] == 1
    assert got[("tb_flow_duration_seconds_count", ())] == 3
    assert got[("tb_flow_duration_seconds_sum", ())] == 6.0
    assert got[("tb_flow_duration_seconds_bucket", (("le", "0.64"),))] == 0
    assert got[("tb_flow_duration_seconds_bucket", (("le", "1.28"),))] == 1
    assert got[("tb_flow_duration_seconds_bucket", (("le", "2.56"),))] == 2
    assert got[("tb_flow_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    # four work items stored on tb.dispatch.linux.chromium, none pulled by a runner
    assert got[("tb_dispatch_queue_depth", (("browser", "chromium"), ("os", "linux")))] == 4
    assert got[("tb_runners_online", (("browser", "chromium"), ("os", "linux")))] == 1
    assert got[("tb_projection_lag_events", ())] == 0
    assert got[("tb_stream_last_seq", ())] == got[("tb_projection_seq", ())] == seq
    # request latency per route template (this process's own)
    timed = ("route", "/api/v1/jobs/{job_id}")
    key = ("tb_api_request_duration_seconds_count", (("method", "GET"), timed, ("status", "200")))
    assert got[key] == 1


async def test_readyz_reports_the_projection_lag(client: AsyncTestClient, bus: Bus) -> None:
    seq = await a_run(bus)
    await client.get("/api/v1/metrics/summary", headers={"TB-Min-Seq": str(seq)})
    body = (await client.get("/readyz")).json()
    assert body["stream_last_seq"] == seq and body["projection_seq"] == seq
    assert body["projection_lag"] == 0


async def test_tb_min_seq_header_is_checked_and_names_itself(
    client: AsyncTestClient, bus: Bus
) -> None:
    for bad in ("-1", "x", "1e3", "99999999999999999999"):
        r = await client.get("/api/v1/jobs", headers={"TB-Min-Seq": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["field"] == "TB-Min-Seq"
    r = await client.get("/api/v1/consents", headers={"TB-Min-Seq": "1000000"})
    assert r.status_code == 409 and r.json()["field"] == "TB-Min-Seq"
    assert "holds no sequence 1000000" in r.json()["detail"]


async def test_metrics_still_answer_from_the_read_model_while_nats_is_down(
    client: AsyncTestClient, bus: Bus, nats_server: NatsServer
) -> None:
    seq = await a_run(bus)
    await client.get("/api/v1/metrics/summary", headers={"TB-Min-Seq": str(seq)})
    await nats_server.kill()
    started = time.monotonic()
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 5  # each source is bounded, and read at once
    got = samples(r.text)
    assert got[("tb_flows_total", (("result", "done"),))] == 3
    for source in ("stream", "dispatch_queues", "presence"):
        assert got[("tb_metrics_source_up", (("source", source),))] == 0
    assert ("tb_projection_lag_events", ()) not in got
