"""The API under load: reading the job list, and pushing progress to many WebSockets.

1. ``GET /api/v1/jobs`` (a page of 50, newest first) with ``--jobs`` jobs in the read
   model, from ``--clients`` concurrent clients on kept-alive connections, until
   ``--requests`` answers or ``--seconds`` pass: p50 and p99 latency and the rate.
2. WebSocket fan-out: ``--sockets`` clients on ``/ws``; each of ``--pushes`` flow
   outcomes is appended to the log, and the time from the projector applying it to
   the last (and the median) client receiving its ``progressUpdate`` is measured.

The API (projector, read model, HTTP and WebSocket) runs in this process, on one
nats-server; the clients run in another process (``benchmarks.api_clients``), so the
two do not share an interpreter. The machine's cores are shared by all three.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import structlog
import uvicorn

from api.app import create_app
from api.services import ApiConfig, IdentityConfig, Services
from benchmarks.state import append_all
from cli.http import call
from cli.nats_server import start_nats_server_on_any_port, wait_for_port
from engine.bus import Bus
from schemas import subjects
from schemas.events import Event, FlowDone, JobCreated, JobStarted
from schemas.presence import RunnerPresence
from schemas.values import JobSettings, Target
from tests.conftest import free_port

NOW = datetime(2026, 1, 1, tzinfo=UTC)
URL = "http://site.test/"
FANOUT_JOB = "job_fanout"


def jobs(count: int, fanout_flows: int) -> Iterator[tuple[Event, str]]:
    """``count`` running jobs of 10 flows, then the job whose outcomes are pushed."""
    for n in range(count):
        job = f"job_{n:07d}"
        yield from _running(job, 10, NOW + timedelta(seconds=n))
    yield from _running(FANOUT_JOB, fanout_flows, NOW + timedelta(days=1))


def _running(job: str, flows: int, at: datetime) -> Iterator[tuple[Event, str]]:
    common = {"id": f"{job}_e", "at": at, "actor": "bench", "job_id": job}
    target = Target(url=URL, flows=flows, clicks=0)
    created = JobCreated(**common, name=job, targets=[target], settings=JobSettings())
    yield created, f"{job}:created"
    yield JobStarted(**common, flows_total=flows, allowed_hosts=["site.test"]), f"{job}:started"


def outcome(n: int) -> tuple[FlowDone, str]:
    event = FlowDone(
        id=f"fanout_{n}", at=datetime.now(UTC), actor="bench", job_id=FANOUT_JOB,
        flow_id=f"{FANOUT_JOB}_0_{n}", attempt=1, runner_id="bench", target_index=0,
        duration_ms=1000,
    )  # fmt: skip
    return event, subjects.flow_msg_id(event)


async def fill(bus: Bus, count: int, fanout_flows: int) -> int:
    await append_all(bus, jobs(count, fanout_flows))
    kv = await bus.kv(subjects.RUNNERS_BUCKET)
    presence = RunnerPresence(runner_id="bench", os="linux", browser="chromium", slots=10)
    await kv.put(presence.runner_id, msgspec.json.encode(presence))
    return await bus.last_seq()


@contextlib.asynccontextmanager
async def api_server(nats_url: str, db: Path) -> AsyncIterator[tuple[int, Services, str]]:
    """The API on a free port, its services, and an API key of its first admin."""
    password = secrets.token_urlsafe(18)
    identity = IdentityConfig(admin_password=password)
    app = create_app(ApiConfig(nats_url=nats_url, db_path=db, identity=identity))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws_max_queue=1000)
    )
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for_port("127.0.0.1", port, timeout=60)
        yield port, app.state.services, await api_key(f"http://127.0.0.1:{port}", password)
    finally:
        server.should_exit = True
        await serving


async def api_key(base: str, password: str) -> str:
    login = {"username": "admin", "password": password}
    status, session = await call("POST", f"{base}/api/v1/auth/login", login)
    assert status == 200, session
    bearer = {"Authorization": f"Bearer {session['token']}"}
    status, made = await call("POST", f"{base}/api/v1/api-keys", {"name": "bench"}, headers=bearer)
    assert status == 201, made
    return str(made["key"])


async def clients(*args: str, key: str, ready: asyncio.Event | None = None) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.api_clients", *args, "--api-key", key,
        stdout=asyncio.subprocess.PIPE, limit=2**26,
    )  # fmt: skip
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    async for line in proc.stdout:
        if line.strip() == b"ready" and ready is not None:
            ready.set()
        elif line.strip():
            result = json.loads(line)
    if await proc.wait() != 0:
        raise RuntimeError(f"clients exited with {proc.returncode}")
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def job_list(port: int, key: str, clients_n: int, requests: int, seconds: float) -> None:
    url = f"http://127.0.0.1:{port}/api/v1/jobs"
    await clients("http", "--url", url, "--clients", "10", "--requests", "200", key=key)  # warm
    result = await clients(
        "http", "--url", url, "--clients", str(clients_n),
        "--requests", str(requests), "--seconds", str(seconds), key=key,
    )  # fmt: skip
    latencies = [s * 1000 for s in result["latencies"]]
    print(
        f"GET /api/v1/jobs (page of 50), {clients_n} concurrent clients:"
        f" p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms,"
        f" {len(latencies) / result['elapsed']:,.0f} req/s"
        f" ({len(latencies):,} requests in {result['elapsed']:.1f}s, {result['errors']} not 200)"
    )


async def fan_out(
    bus: Bus, port: int, services: Services, key: str, sockets: int, pushes: int
) -> None:
    ready = asyncio.Event()
    listening = asyncio.create_task(
        clients(
            "ws", "--url", f"ws://127.0.0.1:{port}/ws", "--sockets", str(sockets),
            "--job", FANOUT_JOB, "--pushes", str(pushes), "--seconds", str(30 + pushes),
        key=key, ready=ready,
    ))  # fmt: skip
    async with asyncio.timeout(120):
        await ready.wait()
    applied: dict[int, float] = {}
    updates = services.projector.subscribe()
    try:
        for n in range(1, pushes + 1):
            event, msg_id = outcome(n)
            appended = await bus.append(event, msg_id=msg_id)
            async with asyncio.timeout(30):
                while True:
                    update = await updates.get()
                    if update.seq >= appended.seq and FANOUT_JOB in update.job_ids:
                        applied[n] = time.time()
                        break
            await asyncio.sleep(0.5)  # one push's fan-out is over before the next
    finally:
        services.projector.unsubscribe(updates)
    received = (await listening)["received"]
    last, median, missing = [], [], 0
    for n, at in applied.items():
        times = received.get(str(n), [])
        missing += sockets - len(times)
        if times:
            last.append((max(times) - at) * 1000)
            median.append((statistics.median(times) - at) * 1000)
    print(
        f"WebSocket fan-out of progressUpdate to {sockets} clients ({pushes} pushes):"
        f" projector applied -> last client received: p50 {statistics.median(last):.1f} ms,"
        f" max {max(last):.1f} ms; -> median client {statistics.median(median):.1f} ms"
        f" ({missing} receipts missing)"
    )


async def main(
    jobs_n: int, clients_n: int, requests: int, seconds: float, sockets: int, pushes: int
) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="tb-bench-api-") as tmp:
        proc, nats_port = await start_nats_server_on_any_port(Path(tmp) / "jetstream")
        try:
            url = f"nats://127.0.0.1:{nats_port}"
            async with await Bus.connect(url, name="bench") as bus:
                await bus.provision()
                started = time.perf_counter()
                last = await fill(bus, jobs_n, pushes)
                async with api_server(url, Path(tmp) / "read.db") as (port, services, key):
                    await services.projector.wait_for(last, timeout=600)
                    print(
                        f"read model: {jobs_n + 1:,} jobs ({last:,} events) stored and"
                        f" projected in {time.perf_counter() - started:.1f}s"
                    )
                    await job_list(port, key, clients_n, requests, seconds)
                    await fan_out(bus, port, services, key, sockets, pushes)
        finally:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--pushes", type=int, default=20)
    a = parser.parse_args()
    asyncio.run(main(a.jobs, a.clients, a.requests, a.seconds, a.sockets, a.pushes))
