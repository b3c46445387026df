"""The runner endpoints and a job's waiting detail, with real runner processes.

Presence entries expire after the bucket's TTL (3 s here, beats every second) with no
event to await, so the tests ask the API again every 0.1 s, within a bound.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.services import ApiConfig
from engine.bus import Bus, BusConfig
from schemas import VERSION, subjects
from schemas.events import FlowDone, RunnerDeregistered, RunnerRegistered
from schemas.ids import utcnow
from tests.api_client import TEST_IDENTITY, log_in
from tests.conftest import NatsServer, free_port
from tests.harness import Embedded, embedded

T = TypeVar("T")
WAIT = 60.0
TTL = 3.0  # the bus fixture's presence TTL; runners beat every TTL / 3
RUNNER_ENV = {"TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": str(int(TTL))}
Live = tuple[Embedded, AsyncTestClient]


@pytest.fixture
async def live(bus: Bus, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Live]:
    """The API app and the engine on one nats-server; runners are started by each test."""
    app = create_app(
        ApiConfig(
            identity=TEST_IDENTITY,
            nats_url=nats_server.url,
            db_path=tmp_path / "api.db",
            bus=BusConfig(ack_wait=3.0, presence_ttl=TTL),
        )
    )
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        async with AsyncTestClient(app=app) as client:
            await log_in(client)
            yield tb, client


async def spawn(
    tb: Embedded, logs: Path, argv: list[str], **env: str
) -> asyncio.subprocess.Process:
    """A real process (killed when the test ends), its output in ``logs/<runner id>.log``."""
    logs.mkdir(exist_ok=True)
    with (logs / f"{argv[argv.index('--runner-id') + 1]}.log").open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *argv,
            env={**os.environ, **RUNNER_ENV, **env},
            stdout=out,
            stderr=out,
        )
    tb.procs.append(proc)
    return proc


async def tb_runner(
    tb: Embedded, logs: Path, runner_id: str, *args: str, **env: str
) -> asyncio.subprocess.Process:
    argv = ["cli.main", "runner", "--nats-url", tb.nats_url, "--runner-id", runner_id, *args]
    return await spawn(tb, logs, argv, **env)


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = WAIT) -> T:
    """The first answer of ``probe`` that is not None, asked every 0.1 s until ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(0.1)  # an entry's TTL lapsing sends nothing to await


async def get(client: AsyncTestClient, path: str) -> Any:
    answer = await client.get(path)
    assert answer.status_code == 200, answer.text
    return answer.json()


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in rows}


def job_body(flows: int, os_name: str = "linux", url: str = "http://127.0.0.1:9/") -> object:
    return {
        "name": f"on {os_name}",
        "targets": [{"url": url, "flows": flows}],
        "settings": {"instance_count": 4, "session_seconds": 0, "max_attempts": 1},
        "platform": {"os": os_name},
    }


async def create(client: AsyncTestClient, body: object) -> str:
    created = await client.post("/api/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id: str = created.json()["job_id"]
    return job_id


@pytest.mark.slow
async def test_runners_advertise_and_a_killed_one_drops_out_only_when_its_ttl_lapses(
    live: Live, tmp_path: Path
) -> None:
    tb, client = live
    logs = tmp_path / "logs"
    # no-op executors launch no browser, so they may stand for runners of other machines
    await tb_runner(
        tb, logs, "runner_w", "--executor", "noop", "--os", "windows", "--slots", "3",
        "--label", "region=eu", "--label", "tier=gold",
        TB_RUNNER_LABELS="team=qa,region=us",
    )  # fmt: skip
    victim = await tb_runner(tb, logs, "runner_m", "--executor", "noop", "--os", "macos")

    async def both_present() -> dict[str, dict[str, Any]] | None:
        runners = by_id(await get(client, "/api/v1/runners"))
        return runners if set(runners) == {"runner_w", "runner_m"} else None

    runners = await eventually(both_present)
    w = runners["runner_w"]
    heartbeat = datetime.fromisoformat(w.pop("last_heartbeat"))
    assert abs((utcnow() - heartbeat).total_seconds()) < TTL + 1
    assert w == {
        "id": "runner_w",
        "os": "windows",
        "browser": "chromium",
        "browser_version": "",  # no browser launched
        "capacity": 3,
        "labels": {"team": "qa", "region": "eu", "tier": "gold"},  # --label wins over env
        "version": VERSION,
        "hostname": w["hostname"],
        "status": "online",
        "online": True,
        "in_flight": 0,
    }
    platforms = await get(client, "/api/v1/runners/available-platforms")
    assert platforms == [
        {"os": "macos", "browser": "chromium", "runners": 1, "slots": 2},
        {"os": "windows", "browser": "chromium", "runners": 1, "slots": 3},
    ]

    # flows run on the platform's runner and count for it
    job_id = await create(client, job_body(5, "windows"))
    view = await tb.wait_terminal(job_id, timeout=WAIT)
    assert (view.status, view.flows_done, view.flows_failed) == ("completed", 5, 0)

    async def counted() -> dict[str, dict[str, Any]] | None:
        status = by_id(await get(client, "/api/v1/runners/status"))
        return status if status["runner_w"]["flows_completed"] == 5 else None

    status = await eventually(counted)
    assert {k: status["runner_w"][k] for k in ("flows_failed", "status", "online", "labels")} == {
        "flows_failed": 0,
        "status": "online",
        "online": True,
        "labels": {"team": "qa", "region": "eu", "tier": "gold"},
    }
    assert 0 < status["runner_w"]["uptime_seconds"] < WAIT
    assert (status["runner_m"]["flows_completed"], status["runner_m"]["status"]) == (0, "online")

    # SIGKILL: no deregistration; the platform stays until the presence entry lapses
    victim.send_signal(signal.SIGKILL)
    await victim.wait()
    killed = time.monotonic()
    platforms = await get(client, "/api/v1/runners/available-platforms")
    assert [p["os"] for p in platforms] == ["macos", "windows"]

    async def macos_gone() -> float | None:
        platforms = await get(client, "/api/v1/runners/available-platforms")
        gone = "macos" not in [p["os"] for p in platforms]
        return time.monotonic() - killed if gone else None

    after = await eventually(macos_gone, timeout=TTL * 5)
    # the last beat came at most one interval (TTL / 3) before the kill
    assert after >= TTL - TTL / 3 - 0.3, after
    print(f"killed runner left available-platforms {after:.2f}s after SIGKILL (TTL {TTL}s)")
    assert "runner_m" not in by_id(await get(client, "/api/v1/runners"))
    m = by_id(await get(client, "/api/v1/runners/status"))["runner_m"]
    assert (m["status"], m["online"], m["in_flight"], m.get("uptime_seconds")) == (
        "offline",
        False,
        0,
        None,
    )
    assert not [
        e
        for e in await tb.bus.load("tb.runner.runner_m.>")
        if isinstance(e.event, RunnerDeregistered)
    ]
    refused = await client.post("/api/v1/jobs", json=job_body(1, "macos"))
    assert refused.status_code == 409, refused.text
    assert refused.json()["field"] == "platform"
    assert refused.json()["rule"] == "No available runners online for macos/chromium"

    # a runner that stops cleanly deregisters and leaves at once, not after its TTL
    survivor = next(p for p in tb.procs if p.returncode is None)
    survivor.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert await survivor.wait() == 0

    async def none_left() -> bool | None:
        return True if await get(client, "/api/v1/runners/available-platforms") == [] else None

    await eventually(none_left, timeout=TTL * 5)
    left = time.monotonic() - stopped
    print(f"stopped runner left available-platforms {left:.2f}s after SIGTERM")
    assert left < TTL, "left on its own, not by its TTL"

    async def deregistered() -> dict[str, Any] | None:
        w = by_id(await get(client, "/api/v1/runners/status"))["runner_w"]
        return w if w["status"] == "deregistered" else None

    w = await eventually(deregistered)
    assert (w["reason"], w["flows_completed"], w["online"]) == ("stopped", 5, False)


@pytest.mark.slow
async def test_a_job_whose_only_runner_dies_waits_saying_so_and_ends_exactly_on_a_new_one(
    live: Live, tmp_path: Path
) -> None:
    from tests.runner_proc import read_runs

    tb, client = live
    logs, record = tmp_path / "logs", tmp_path / "runs.jsonl"

    async def sleeping_runner(runner_id: str) -> asyncio.subprocess.Process:
        argv = ["tests.runner_proc", "--nats-url", tb.nats_url, "--runner-id", runner_id]
        return await spawn(
            tb, logs, [*argv, "--seconds", "1", "--slots", "1", "--record", str(record)]
        )

    async def present(runner_id: str) -> bool | None:
        return True if runner_id in by_id(await get(client, "/api/v1/runners")) else None

    first = await sleeping_runner("runner_a")
    await eventually(lambda: present("runner_a"))
    job_id = await create(client, job_body(6))
    await tb.wait_job(job_id, lambda v: v.flows_done >= 2, timeout=WAIT)
    view = await get(client, f"/api/v1/jobs/{job_id}")
    assert view["status"] == "running" and "detail" not in view

    first.send_signal(signal.SIGKILL)  # mid-flow: one work item is held, unacked
    await first.wait()
    killed = time.monotonic()
    waiting = "waiting for a runner for linux/chromium"

    async def says_waiting() -> dict[str, Any] | None:
        view = await get(client, f"/api/v1/jobs/{job_id}")
        return view if view.get("detail") == waiting else None

    view = await eventually(says_waiting, timeout=TTL * 5)
    print(f"job said {waiting!r} {time.monotonic() - killed:.2f}s after the SIGKILL")
    assert view["status"] == "running" and view["flows_done"] < 6

    async def listed_waiting() -> bool | None:
        # read from presence at each request: a read that finds NATS slow says nothing extra
        listed = [j for j in await get(client, "/api/v1/jobs") if j["job_id"] == job_id]
        return True if listed and listed[0].get("detail") == waiting else None

    assert await eventually(listed_waiting, timeout=TTL * 5)

    await sleeping_runner("runner_b")
    done = await tb.wait_terminal(job_id, timeout=WAIT)
    assert (done.status, done.flows_done, done.flows_failed) == ("completed", 6, 0)
    assert "detail" not in await get(client, f"/api/v1/jobs/{job_id}")
    ended = {
        e.event.flow_id
        for e in await tb.bus.load(subjects.all_flows("FlowDone"))
        if isinstance(e.event, FlowDone) and e.event.job_id == job_id
    }
    assert len(ended) == 6

    async def counted() -> dict[str, dict[str, Any]] | None:
        status = by_id(await get(client, "/api/v1/runners/status"))
        ran = sum(status[r]["flows_completed"] for r in ("runner_a", "runner_b") if r in status)
        return status if ran == 6 else None

    # each flow counts once, for the runner that finished it; the killed one is offline
    status = await eventually(counted)
    assert (status["runner_a"]["status"], status["runner_b"]["status"]) == ("offline", "online")
    assert status["runner_a"]["flows_failed"] + status["runner_b"]["flows_failed"] == 0
    runs = read_runs(record)
    cut = {r.flow_id for r in runs if r.runner == "runner_a" and r.ended is None}
    # the flow the kill cut short (none, if it landed between two flows) …
    assert len(cut) <= 1
    assert cut <= {
        r.flow_id for r in runs if r.runner == "runner_b" and r.how == "done"
    }  # … ran again


@pytest.mark.slow
async def test_a_chromium_runner_advertises_the_version_it_launched_and_counts_its_failures(
    live: Live, tmp_path: Path
) -> None:
    tb, client = live
    await tb_runner(tb, tmp_path / "logs", "runner_c", "--slots", "1", "--label", "kind=real")

    async def present() -> dict[str, Any] | None:
        return by_id(await get(client, "/api/v1/runners")).get("runner_c")

    runner = await eventually(present)
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", runner["browser_version"]), runner
    assert (runner["os"], runner["browser"], runner["capacity"], runner["labels"]) == (
        "linux",
        "chromium",
        1,
        {"kind": "real"},
    )
    [registered] = [
        e.event
        for e in await tb.bus.load("tb.runner.runner_c.>")
        if isinstance(e.event, RunnerRegistered)
    ]
    assert (registered.browser_version, registered.labels) == (
        runner["browser_version"],
        {"kind": "real"},
    )

    # nothing listens on the target's port: the one attempt fails in the browser
    job_id = await create(client, job_body(1, url=f"http://127.0.0.1:{free_port()}/"))
    view = await tb.wait_terminal(job_id, timeout=WAIT)
    assert (view.flows_done, view.flows_failed) == (0, 1)

    async def counted() -> dict[str, Any] | None:
        status = by_id(await get(client, "/api/v1/runners/status"))["runner_c"]
        # in_flight comes with the next heartbeat, the count once the read model has it
        return status if (status["flows_failed"], status["in_flight"]) == (1, 0) else None

    status = await eventually(counted)
    assert (status["flows_completed"], status["status"]) == (0, "online")
    assert status["browser_version"] == runner["browser_version"]
