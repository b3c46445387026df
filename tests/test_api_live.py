"""Live updates over WebSocket and SSE, served by uvicorn on loopback against a real
nats-server: numbers equal the job view, subscriptions filter, SSE per job, slow
clients are cut off without holding anyone back."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from litestar import Litestar
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agents.executor import NoopExecutor
from agents.runner import Runner
from api.app import create_app
from api.live_hub import LiveHub
from api.services import ApiConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus
from engine.jobs.service import job_id_for
from schemas.values import Target
from tests.api_client import TEST_IDENTITY, bearer, put_presence, when_registered
from tests.conftest import NatsServer
from tests.harness import embedded

WAIT = 30
AUTH: dict[str, dict[str, str]] = {}  # host -> the headers of its admin session


@asynccontextmanager
async def served(app: Litestar, send_buffer: int | None = None) -> AsyncIterator[str]:
    """The app on a free loopback port; yields its host:port. ``send_buffer``: the size of
    each connection's kernel send buffer (accepted sockets inherit the listener's)."""
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listening.bind(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        async with asyncio.timeout(WAIT):
            await wait_for_port("127.0.0.1", port)
            AUTH[f"127.0.0.1:{port}"] = await bearer(f"http://127.0.0.1:{port}")
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving
        listening.close()


@asynccontextmanager
async def running_system(bus: Bus, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[None]:
    """Engine, projector and a runner whose flows end at once, on 127.0.0.1's consent;
    everything inside is time-boxed."""
    async with embedded(bus, nats_server.url, tmp_path) as tb, asyncio.timeout(WAIT):
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        runner = Runner(bus, NoopExecutor(), slots=4, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        await registered.wait()
        yield


async def runner_present(nats_server: NatsServer) -> None:
    """A linux runner's presence, so jobs can be created (nothing runs them)."""
    async with await Bus.connect(nats_server.url, name="test") as bus:
        await bus.provision()
        await put_presence(bus)


def job_body(name: str, targets: int = 1, flows: int = 2) -> dict[str, object]:
    return {
        "name": name,
        "targets": [
            {"url": f"http://127.0.0.1:9/{i}", "flows": flows, "clicks": 1} for i in range(targets)
        ],
        "settings": {"instance_count": 4, "session_seconds": 0},
    }


class Note(msgspec.Struct, tag="note", tag_field="type"):
    text: str


async def next_message(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await ws.recv())
    return message


async def until(ws: ClientConnection, job_id: str, status: str) -> list[dict[str, Any]]:
    """Messages up to and including the job's progressUpdate in ``status``."""
    seen = []
    while True:
        message = await next_message(ws)
        seen.append(message)
        if (message["type"], message.get("job_id"), message.get("status")) == (
            "progressUpdate",
            job_id,
            status,
        ):
            return seen


async def test_progress_at_the_end_equals_the_job_view(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    async with (
        running_system(bus, nats_server, tmp_path),
        served(app) as host,
        connect(f"ws://{host}/ws", additional_headers=AUTH[host]) as ws,
        httpx.AsyncClient(base_url=f"http://{host}", headers=AUTH[host]) as http,
    ):
        r = await http.post("/api/v1/jobs", json=job_body("live", targets=3, flows=8))
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        seen = await until(ws, job_id, "completed")
        end = seen[-1]
        view = (await http.get(f"/api/v1/jobs/{job_id}?min_seq={end['seq']}")).json()
        runners = (await http.get("/api/v1/runners/status")).json()

    assert (
        (end["total"], end["success"], end["fail"])
        == (
            view["flows_total"],
            view["flows_done"],
            view["flows_failed"],
        )
        == (24, 24, 0)
    )
    assert end["eta_seconds"] is None and end["rate"] > 0
    rows = ("url", "flow_done", "flow_target", "click_done", "click_target", "flow_failed")
    assert [{k: t[k] for k in rows} for t in end["targets"]] == [
        {k: t[k] for k in rows} for t in view["targets"]
    ]
    ours = [m for m in seen if m.get("job_id") == job_id]
    statuses = [m["status"] for m in ours if m["type"] == "jobInfo"]
    assert statuses[-1] == "completed" and "running" in statuses  # created may coalesce
    assert len(statuses) == len(set(statuses))
    last_flow = {m["idx"]: m["flow_done"] for m in ours if m["type"] == "flowDoneUpdate"}
    last_click = {m["idx"]: m["click_done"] for m in ours if m["type"] == "clickDoneUpdate"}
    assert last_flow == last_click == {0: 8, 1: 8, 2: 8}
    seqs = [m["seq"] for m in seen if "seq" in m]
    assert seqs == sorted(seqs)  # never an older state after a newer one
    # bursts coalesce: fewer progress updates than the job's 3 events per flow and more
    progress = sum(m["type"] == "progressUpdate" for m in ours)
    assert progress < 3 * 24
    [runner_row] = runners
    last_runner = [m for m in seen if m["type"] == "runnerUpdate"][-1]
    assert last_runner["runner"]["flows_completed"] == runner_row["flows_completed"] == 24
    print(f"progressUpdates={progress} for 24 flows; messages={Counter(m['type'] for m in seen)}")


async def test_a_subscription_chooses_jobs_and_bad_requests_name_the_field(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await runner_present(nats_server)
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    chosen, other = job_id_for("live-chosen"), job_id_for("live-other")
    async with (
        asyncio.timeout(WAIT),
        served(app) as host,
        connect(f"ws://{host}/ws", additional_headers=AUTH[host]) as narrow,
        connect(f"ws://{host}/ws", additional_headers=AUTH[host]) as everything,
        httpx.AsyncClient(base_url=f"http://{host}", headers=AUTH[host]) as http,
    ):
        await narrow.send(json.dumps({"type": "subscribe", "jobs": [chosen]}))
        assert await next_message(narrow) == {
            "type": "subscribed",
            "jobs": [chosen],
            "runners": False,
            "proxies": False,
            "unknown": [chosen],  # not created yet: subscribing ahead is fine
        }
        for key in ("live-other", "live-chosen"):
            r = await http.post(
                "/api/v1/jobs", json=job_body(key), headers={"Idempotency-Key": key}
            )
            assert r.status_code == 201, r.text
        r = await http.post("/api/v1/proxies", json={"url": "http://127.0.0.1:3128"})
        assert r.status_code == 201, r.text
        await http.post(f"/api/v1/jobs/{other}/cancel")
        await http.post(f"/api/v1/jobs/{chosen}/cancel")
        got_narrow = await until(narrow, chosen, "cancelled")
        got_all = await until(everything, chosen, "cancelled")

        # what another source publishes (log lines): to the job's clients, or only to those
        # that chose it
        hub: LiveHub = app.state.live_hub
        hub.publish(chosen, Note(text="one"))
        hub.publish(chosen, Note(text="two"), chosen_only=True)
        hub.publish(other, Note(text="three"))
        notes_narrow = [await next_message(narrow) for _ in range(2)]
        notes_all = [await next_message(everything) for _ in range(2)]

        # a newly chosen job that exists comes with its state now
        await narrow.send(json.dumps({"type": "subscribe", "jobs": [other], "proxies": True}))
        snapshot = [await next_message(narrow) for _ in range(3)]
        await narrow.send(json.dumps({"type": "unsubscribe", "jobs": [chosen, other]}))
        left = await next_message(narrow)

        refusals = []
        for bad in (
            "not json",
            json.dumps({"type": "subscribe", "jobs": "all"}),
            json.dumps({"type": "subscribe", "jobs": ["ok", "not an id!"]}),
            json.dumps({"type": "resubscribe"}),
            json.dumps({"jobs": []}),
            json.dumps({"type": "subscribe", "surprise": 1}),
            json.dumps({"type": "subscribe", "jobs": [f"j{i}" for i in range(1001)]}),
            "x" * 70_000,
        ):
            await narrow.send(bad)
            refusals.append(await next_message(narrow))
        await narrow.send(json.dumps({"type": "subscribe"}))  # still served
        still = await next_message(narrow)

        # a client that keeps sending what is refused is closed
        async with connect(f"ws://{host}/ws", additional_headers=AUTH[host]) as spammer:
            for _ in range(100):
                await spammer.send("not json")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await spammer.recv()

    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "100 messages refused")
    assert [m["text"] for m in notes_narrow] == ["one", "two"]
    assert [m["text"] for m in notes_all] == ["one", "three"]
    assert {m.get("job_id") for m in got_narrow} == {chosen}
    assert {m["type"] for m in got_narrow} == {"jobInfo", "progressUpdate"}
    assert {m.get("job_id") for m in got_all} >= {chosen, other}
    assert "proxyUpdate" in {m["type"] for m in got_all}
    assert [(m["type"], m.get("job_id"), m.get("status")) for m in snapshot] == [
        ("jobInfo", other, "cancelled"),
        ("progressUpdate", other, "cancelled"),
        ("subscribed", None, None),
    ]
    assert snapshot[2]["jobs"] == sorted([chosen, other]) and snapshot[2]["proxies"] is True
    assert (left["type"], left["jobs"]) == ("subscribed", [])
    assert {m["type"] for m in refusals} == {"error"}
    assert [m["field"] for m in refusals] == [
        "$",
        "jobs",
        "jobs[1]",
        "type",
        "type",
        "surprise",
        "jobs",
        "$",
    ], refusals
    assert still["type"] == "subscribed"


async def test_sse_streams_one_job_with_keepalives_until_it_closes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await runner_present(nats_server)
    config = ApiConfig(
        identity=TEST_IDENTITY,
        nats_url=nats_server.url,
        db_path=tmp_path / "api.db",
        live_keepalive=0.3,
    )
    app = create_app(config)
    async with (
        asyncio.timeout(WAIT),
        served(app) as host,
        httpx.AsyncClient(base_url=f"http://{host}", headers=AUTH[host], timeout=10) as http,
    ):
        assert (await http.get("/api/v1/jobs/job_nope/events/stream")).status_code == 404
        bad = await http.get("/api/v1/jobs/not%20an%20id/events/stream")
        assert bad.status_code == 400 and bad.json()["field"] == "job_id"
        other = (await http.post("/api/v1/jobs", json=job_body("other"))).json()
        created = (await http.post("/api/v1/jobs", json=job_body("sse"))).json()
        job_id = created["job_id"]
        url = f"/api/v1/jobs/{job_id}/events/stream?min_seq={created['seq']}"
        lines: list[str] = []
        async with http.stream("GET", url) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                lines.append(line)
                if line == ": keepalive" and lines.count(line) == 1:
                    hub: LiveHub = app.state.live_hub
                    hub.publish(job_id, Note(text="for its viewers"), chosen_only=True)
                    hub.publish(other["job_id"], Note(text="another job's"))
                    await http.post(f"/api/v1/jobs/{other['job_id']}/cancel")
                    await http.post(f"/api/v1/jobs/{job_id}/cancel")
        # the stream ended by itself after the job closed
        again = await http.get(f"/api/v1/jobs/{job_id}/events/stream")

    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data:")]
    assert [(e["type"], e.get("status") or e.get("text")) for e in events] == [
        ("jobInfo", "created"),
        ("progressUpdate", "created"),
        ("note", "for its viewers"),
        ("jobInfo", "cancelled"),
        ("progressUpdate", "cancelled"),
    ]
    assert {e["job_id"] for e in events if e["type"] != "note"} == {job_id}
    assert ": keepalive" in lines
    closed = [json.loads(line[6:]) for line in again.text.splitlines() if line.startswith("data:")]
    assert [(e["type"], e["status"]) for e in closed] == [
        ("jobInfo", "cancelled"),
        ("progressUpdate", "cancelled"),
    ]


def websocket_that_never_reads(host: str) -> socket.socket:
    """A WebSocket client on a raw socket with a tiny receive window, that never reads."""
    address, port = host.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((address, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: {AUTH[host]['Authorization']}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def close_frame(data: bytes) -> tuple[int, str] | None:
    """The code and reason of the server's close frame in ``data``, if it is there."""
    at = 0
    while at + 2 <= len(data):
        opcode, size = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if size == 126:
            (size,) = struct.unpack("!H", data[at : at + 2])
            at += 2
        elif size == 127:
            (size,) = struct.unpack("!Q", data[at : at + 8])
            at += 8
        payload = data[at : at + size]
        at += size
        if opcode == 8 and len(payload) >= 2:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
    return None


def read_until_closed(sock: socket.socket) -> bytes:
    """What reaches the client, up to the server's close frame or the end of the stream."""
    sock.settimeout(10)
    data = b""
    while close_frame(data) is None and (chunk := sock.recv(1 << 20)):
        data += chunk
    return data


async def test_a_client_that_never_reads_is_cut_off_and_holds_back_no_one(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = ApiConfig(
        identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db", live_queue=4
    )
    app = create_app(config)
    jobs = 60
    async with (
        embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb,
        asyncio.timeout(WAIT),
        served(app, send_buffer=8192) as host,
        connect(f"ws://{host}/ws", additional_headers=AUTH[host], max_size=None) as reader,
    ):
        stuck = await asyncio.to_thread(websocket_that_never_reads, host)
        hub: LiveHub = app.state.live_hub
        async with asyncio.timeout(5):  # the server has taken both connections
            while hub.clients < 2:  # noqa: ASYNC110 (a count, no event to await)
                await asyncio.sleep(0.01)
        # big messages: 200 targets per job, so a few fill the socket buffers
        targets = [Target(url=f"http://127.0.0.1:9/{i}", flows=1) for i in range(200)]
        projector = app.state.services.projector
        ids = []
        for _ in range(jobs):
            ids.append(await tb.create_job(targets))
            await projector.wait_for(await bus.last_seq(), timeout=10)  # an update each, mostly
        async with asyncio.timeout(10):
            while hub.dropped == 0:  # noqa: ASYNC110 (a count, no event to await)
                await asyncio.sleep(0.01)
        # the server tries its close frame for a while: read now to see it
        data = await asyncio.to_thread(read_until_closed, stuck)
        stuck.close()
        got: set[str] = set()
        while got != set(ids):  # the reading client gets every job, however stuck the other
            message = await next_message(reader)
            if message["type"] == "progressUpdate":
                got.add(message["job_id"])
        # the API's projector applied everything: the stuck client held nothing back
        position, last = projector.position, await bus.last_seq()
        dropped, clients = hub.dropped, hub.clients
    assert (dropped, clients) == (1, 1)
    assert position == last
    print(f"unread client: {len(data)} bytes reached it before the cut")
    assert close_frame(data) == (1008, "too slow: 4 updates left unread")


async def test_an_sse_client_that_never_reads_is_cut_off(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = ApiConfig(
        identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db", live_queue=4
    )
    app = create_app(config)
    async with (
        embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb,
        asyncio.timeout(WAIT),
        served(app, send_buffer=8192) as host,
    ):
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=1)])
        path = f"/api/v1/jobs/{job_id}/events/stream?min_seq={await bus.last_seq()}"
        stuck = await asyncio.to_thread(stream_that_never_reads, host, path)
        hub: LiveHub = app.state.live_hub
        async with asyncio.timeout(5):
            while hub.clients < 1:  # noqa: ASYNC110 (a count, no event to await)
                await asyncio.sleep(0.01)
        for _ in range(400):  # 100 kB each, as a job's log lines could be, until cut off
            hub.publish(job_id, Note(text="x" * 100_000), chosen_only=True)
            await asyncio.sleep(0.01)  # time enough for a client that reads to keep up
            if hub.dropped:
                break
        data = await asyncio.to_thread(read_to_end, stuck)  # the server ends the response
        stuck.close()
        dropped, clients = hub.dropped, hub.clients
    assert (dropped, clients) == (1, 0)
    assert data.startswith(b"HTTP/1.1 200")


def stream_that_never_reads(host: str, path: str) -> socket.socket:
    address, port = host.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((address, int(port)))
    authorization = AUTH[host]["Authorization"]
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n\r\n".encode()
    )
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


@pytest.mark.slow  # 8-14 s: a real Chromium starts and stops
async def test_the_dashboard_shows_a_job_live_in_a_browser(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    from agents.browser import launch_chromium

    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "api.db")
    )
    async with (
        running_system(bus, nats_server, tmp_path),
        served(app) as host,
        async_playwright() as playwright,
        httpx.AsyncClient(base_url=f"http://{host}", headers=AUTH[host]) as http,
    ):
        browser = await launch_chromium(playwright)
        try:
            context = await browser.new_context()
            token = AUTH[host]["Authorization"].removeprefix("Bearer ")
            await context.add_cookies(
                [{"name": "tb_session", "value": token, "url": f"http://{host}"}]
            )
            page = await context.new_page()
            await page.goto(f"http://{host}/")
            await page.locator("#conn", has_text="live").wait_for()
            loop = asyncio.get_running_loop()
            started = loop.time()
            r = await http.post("/api/v1/jobs", json=job_body("on the page", flows=6))
            job_id = r.json()["job_id"]
            row = page.locator("#jobs tbody tr", has_text=job_id)
            # live, not the page's reload every 10 s
            await row.locator(".status", has_text="completed").wait_for(timeout=8000)
            text, took = await row.inner_text(), loop.time() - started
            print(f"dashboard showed the completed job {took:.2f}s after the page was live")
        finally:
            await browser.close()
    assert "on the page" in text and "6/6" in text
