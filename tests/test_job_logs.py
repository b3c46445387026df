"""Job logs through the API served on loopback, on a real nats-server: ingest with the
answers crawler-style workers read, SSE, external jobs, saved logs, runner lines, /ws."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from agents.executor import NoopExecutor
from agents.runner import Runner
from api.app import create_app
from api.services import ApiConfig, LogsConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus
from engine.job_logs import read_log
from schemas import subjects
from schemas.values import Target
from tests.api_client import TEST_IDENTITY, bearer, log_in, when_registered
from tests.conftest import NatsServer, free_port
from tests.harness import embedded

KEY = "s3cret-ingest-key"
RECEIVED = "Log message received and queued"
Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Serve]:
    """Start the API on a loopback port with the given log settings; returns its URL."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(key: str | None = None, keepalive: float = 15.0) -> str:
        logs = LogsConfig(ingest_api_key=key, keepalive=keepalive, save_after=0.1)
        config = ApiConfig(
            identity=TEST_IDENTITY,
            nats_url=nats_server.url,
            db_path=tmp_path / "read.db",
            logs=logs,
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                timeout_graceful_shutdown=5,
            )
        )
        servers.append((server, asyncio.create_task(server.serve())))
        await wait_for_port("127.0.0.1", port)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, task in servers:
        server.should_exit = True
        _, pending = await asyncio.wait([task], timeout=15)
        if pending:  # never let a server that will not stop hold the suite
            server.force_exit = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def http(base: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in as the first admin (log ingest ignores the session)."""
    headers = await bearer(base)
    async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as client:
        yield client


async def start_external(client: httpx.AsyncClient) -> str:
    r = await client.post(
        "/api/crawler/start",
        json={"domain_count": 3, "keywords": ["a"]},
        headers={"X-API-Key": KEY},  # ignored by a server with no ingest key
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "started" and body["message"] and body["job_id"].startswith("job_")
    return str(body["job_id"])


async def sse_lines(response: httpx.Response, want: int) -> list[str]:
    """Raw lines of an SSE response until ``want`` data lines arrived."""
    seen: list[str] = []
    async for line in response.aiter_lines():
        seen.append(line)
        if sum(s.startswith("data: ") for s in seen) >= want:
            return seen
    return seen


async def status_now(client: httpx.AsyncClient, bus: Bus, job_id: str) -> dict[str, object]:
    """The job's status once the read model has applied everything stored so far (the
    ingest appends a line's job events before it answers)."""
    seq = await bus.last_seq()
    r = await client.get(f"/api/crawler/status/{job_id}?min_seq={seq}")
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


# -- SSE -------------------------------------------------------------------------------


async def test_a_line_posted_to_v1_arrives_on_the_sse_stream(serve: Serve) -> None:
    base = await serve(keepalive=0.3)
    async with http(base) as client:
        job_id = await start_external(client)
        first = await client.post("/api/v1/logs", json={"job_id": job_id, "message": "[INFO] one"})
        assert first.status_code == 200, first.text
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/logs/stream") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            posted = asyncio.create_task(
                client.post(
                    "/api/v1/logs", json={"job_id": job_id, "message": "[SUCCESS] two\nlines"}
                )
            )
            async with asyncio.timeout(10):
                lines = await sse_lines(stream, 3)
            assert (await posted).status_code == 200
    # from the job's first line on, then live; a line break becomes two data lines
    data = [line for line in lines if line.startswith("data: ")]
    assert data == ["data: [INFO] one", "data: [SUCCESS] two", "data: lines"]
    assert lines[:2] == ["data: [INFO] one", ""]


async def test_the_stream_sends_keepalives_and_ends_with_its_job(serve: Serve) -> None:
    base = await serve(keepalive=0.2)
    async with http(base) as client:
        job_id = await start_external(client)
        async with client.stream("GET", f"/api/crawler/logs/{job_id}") as stream:
            seen: list[str] = []
            kept_alive = asyncio.Event()

            async def read() -> None:
                async for line in stream.aiter_lines():
                    seen.append(line)
                    if line == ": keepalive":
                        kept_alive.set()

            reading = asyncio.create_task(read())
            async with asyncio.timeout(10):
                await kept_alive.wait()
                summary = '[SUMMARY] {"status": "success"}'
                r = await client.post(
                    "/api/crawler/log", json={"job_id": job_id, "message": summary}
                )
                assert r.status_code == 200
                await reading  # the job ended: the stream ends after its last line
    assert f"data: {summary}" in seen
    assert seen[-2:] == [f"data: {summary}", ""] or seen[-1] == ""


async def test_a_stream_of_an_unknown_job_is_404(serve: Serve) -> None:
    base = await serve()
    async with http(base) as client:
        r = await client.get("/api/crawler/logs/job_nope")
        assert (r.status_code, r.json()["detail"]) == (404, "Job job_nope not found")
        r = await client.get("/api/v1/jobs/job_nope/logs/stream")
        assert r.status_code == 404
        assert (await client.get("/api/v1/jobs/bad.id/logs/stream")).status_code == 400


# -- the legacy answers ----------------------------------------------------------------


async def test_every_legacy_ingest_answer(serve: Serve) -> None:
    base = await serve(key=KEY)
    ok = {"X-API-Key": KEY}
    async with http(base) as client:
        job_id = await start_external(client)
        post = client.post
        line = {"job_id": job_id, "message": "[INFO] hello"}

        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}):
            r = await post("/api/crawler/log", json=line, headers=headers)
            assert (r.status_code, r.json()["detail"]) == (403, "Invalid API key")
            r = await post("/api/v1/logs", json=line, headers=headers)
            assert (r.status_code, r.json()["detail"]) == (403, "Invalid API key")
        # the key is checked before the body
        r = await post("/api/crawler/log", content=b"", headers={"X-API-Key": "wrong"})
        assert r.status_code == 403

        r = await post("/api/crawler/log", json=line, headers=ok)
        assert r.status_code == 200
        assert r.json() == {"status": "success", "job_id": job_id, "message": RECEIVED}
        r = await post("/api/v1/logs", json=line, headers=ok)
        assert r.status_code == 200
        assert r.json() == {"status": "success", "job_id": job_id, "message": RECEIVED}

        unknown = {"job_id": "job_nope", "message": "x"}
        for path in ("/api/crawler/log", "/api/v1/logs"):
            r = await post(path, json=unknown, headers=ok)
            assert r.status_code == 404
            assert r.json()["detail"] == "Job job_nope not found or already completed"
        for bad_id in ("no such.job", "tb.>", "*"):  # never reaches a subject
            body = {"job_id": bad_id, "message": "x"}
            for headers in (ok, {**ok, "Idempotency-Key": "k-1"}):
                async with asyncio.timeout(10):
                    r = await post("/api/crawler/log", json=body, headers=headers)
                assert r.status_code == 404
                assert r.json()["detail"] == f"Job {bad_id} not found or already completed"

        deep = b'{"job_id": ' + b"[" * 40 + b"]" * 40 + b"}"
        for body in (b"", b"{}", b"not json", b'{"job_id": 1, "message": "x"}', b"[]", deep):
            r = await post("/api/crawler/log", content=body, headers=ok)
            assert r.status_code == 422, (body, r.text)
            r = await post("/api/v1/logs", content=body, headers=ok)
            assert r.status_code == 400, (body, r.text)
        r = await post("/api/crawler/log", json={"job_id": job_id}, headers=ok)
        assert r.status_code == 422 and r.json()["field"].endswith("message")

        # legacy workers may send more fields; the v1 API names an unknown one
        extra = {**line, "source": "worker-1"}
        assert (await post("/api/crawler/log", json=extra, headers=ok)).status_code == 200
        r = await post("/api/v1/logs", json=extra, headers=ok)
        assert r.status_code == 400 and r.json()["field"].endswith("source")

        # the legacy stream takes the ingest key when one is configured
        assert (await client.get(f"/api/crawler/logs/{job_id}")).status_code == 403

        # a finished job takes no more lines
        r = await post(f"/api/crawler/cancel/{job_id}", headers=ok)
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled" and r.json()["job_id"] == job_id
        r = await post("/api/crawler/log", json=line, headers=ok)
        assert r.status_code == 404
        assert r.json()["detail"] == f"Job {job_id} not found or already completed"
        r = await post(f"/api/crawler/cancel/{job_id}", headers=ok)
        assert (r.status_code, r.json()["detail"]) == (
            404,
            f"Job {job_id} not found or already completed",
        )
        r = await client.get("/api/crawler/status/job_nope", headers=ok)
        assert (r.status_code, r.json()["detail"]) == (404, "Job job_nope not found")


async def test_without_a_key_ingest_is_open_to_loopback_only(
    serve: Serve, nats_server: NatsServer, tmp_path: Path
) -> None:
    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)
        r = await client.post("/api/crawler/log", json={"job_id": job_id, "message": "hi"})
        assert r.status_code == 200
        assert (await client.get(f"/api/crawler/status/{job_id}")).status_code == 200
        # a client a reverse proxy on this machine forwards is no loopback client
        for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
            r = await client.post(
                "/api/v1/logs",
                json={"job_id": job_id, "message": "hi"},
                headers={header: "203.0.113.7"},
            )
            assert r.status_code == 403, header
    # the test client is no loopback client ("testclient")
    app = create_app(
        ApiConfig(identity=TEST_IDENTITY, nats_url=nats_server.url, db_path=tmp_path / "other.db")
    )
    async with AsyncTestClient(app=app) as remote:
        await log_in(remote)
        r = await remote.post("/api/crawler/log", json={"job_id": job_id, "message": "hi"})
        assert r.status_code == 403 and r.json()["detail"].startswith("Invalid API key")
        assert (
            await remote.post("/api/v1/logs", json={"job_id": job_id, "message": "hi"})
        ).status_code == 403


# -- external jobs ---------------------------------------------------------------------


async def test_an_external_jobs_progress_and_summary(serve: Serve, bus: Bus) -> None:
    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)
        status = await status_now(client, bus, job_id)
        assert (status["status"], status["progress"], status["kind"]) == ("running", 0, "external")
        for n in (20, 40):
            msg = f"[INFO] Progress: {n}% - Generated domain {n // 20}/5"
            r = await client.post("/api/crawler/log", json={"job_id": job_id, "message": msg})
            assert r.status_code == 200
        body = await status_now(client, bus, job_id)
        assert body["progress"] == 40
        running = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        assert (running["status"], running["progress"]) == ("running", 40)
        assert "detail" not in running  # no runner is online, and none is waited for
        assert body["message"] == "[INFO] Progress: 40% - Generated domain 2/5"
        summary = '[SUMMARY] {"status": "success", "domains_generated": {"success": 5, "total": 5}}'
        r = await client.post("/api/crawler/log", json={"job_id": job_id, "message": summary})
        assert r.status_code == 200
        done = await status_now(client, bus, job_id)
        assert (done["status"], done["progress"]) == ("completed", 100)
        view = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        assert (view["kind"], view["status"], view["targets"]) == ("external", "completed", [])
        r = await client.post("/api/crawler/log", json={"job_id": job_id, "message": "late"})
        assert r.status_code == 404

        # a summary that did not succeed fails its job; one that is no JSON too, flagged
        failed = await start_external(client)
        await client.post(
            "/api/crawler/log", json={"job_id": failed, "message": '[SUMMARY] {"status": "error"}'}
        )
        ended = await status_now(client, bus, failed)
        assert (ended["status"], ended["message"]) == ("failed", "[SUMMARY] status 'error'")
        garbled = await start_external(client)
        r = await client.post(
            "/api/crawler/log", json={"job_id": garbled, "message": "[SUMMARY] {not json"}
        )
        assert r.status_code == 200
        ended = await status_now(client, bus, garbled)
        assert ended["status"] == "failed"
        assert str(ended["message"]).startswith("[SUMMARY] unreadable: not JSON")
        r = await client.get(f"/api/v1/jobs/{garbled}/logs?format=jsonl")
        [line] = [json.loads(x) for x in r.text.splitlines()]
        assert line["message"] == "[SUMMARY] {not json" and "not JSON" in line["flag"]
        assert line["level"] == "SUMMARY" and line["source"] == "ingest"


async def test_an_ended_jobs_log_is_saved_and_downloadable(serve: Serve, bus: Bus) -> None:
    base = await serve()
    store = await bus.js.object_store(subjects.LOGS_BUCKET)
    saves = await store.watch(updates_only=True)
    async with http(base) as client:
        job_id = await start_external(client)
        for msg in ("[INFO] a", "[ERROR] b", '[SUMMARY] {"status": "success"}'):
            await client.post("/api/v1/logs", json={"job_id": job_id, "message": msg})
        assert (await status_now(client, bus, job_id))["status"] == "completed"
        async with asyncio.timeout(10):  # saved by the API on its own
            while (await saves.updates(timeout=10)).name != subjects.saved_log_name(job_id):
                pass
        saved = await store.get(subjects.saved_log_name(job_id))
        assert len((saved.data or b"").splitlines()) == 3
        await bus.js.purge_stream(subjects.LOGS_STREAM)  # as if aged out of TB_LOGS
        txt = await client.get(f"/api/v1/jobs/{job_id}/logs")
        assert txt.status_code == 200 and txt.headers["content-type"].startswith("text/plain")
        assert [line.split(" ", 2)[1:] for line in txt.text.splitlines()] == [
            ["ingest", "[INFO] a"],
            ["ingest", "[ERROR] b"],
            ["ingest", '[SUMMARY] {"status": "success"}'],
        ]
        jsonl = await client.get(f"/api/v1/jobs/{job_id}/logs?format=jsonl")
        rows = [json.loads(x) for x in jsonl.text.splitlines()]
        assert [r["level"] for r in rows] == ["INFO", "ERROR", "SUMMARY"]
        assert rows[2]["summary"] == {"status": "success"}
        assert (await client.get("/api/v1/jobs/job_nope/logs")).status_code == 404
        assert (await client.get(f"/api/v1/jobs/{job_id}/logs?format=pdf")).status_code == 400


# -- runner lines and /ws --------------------------------------------------------------


async def test_runners_write_their_flows_into_the_jobs_log(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        registered = asyncio.Event()
        runner = Runner(bus, NoopExecutor(), slots=2, announce=when_registered(registered))
        tb.run(runner.run(), "runner")
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=3)])
        view = await tb.wait_terminal(job_id)
        assert view.status == "completed"
        async with asyncio.timeout(10):
            while True:
                lines = [
                    s.line async for batch in read_log(bus, job_id, follow=False) for s in batch
                ]
                if len(lines) >= 6:
                    break
                await asyncio.sleep(0.05)
    assert {line.source for line in lines} == {runner.runner_id}
    received = [line for line in lines if line.message.startswith("[INFO] Flow received: ")]
    done = [line for line in lines if line.message.startswith("[SUCCESS] Flow done: ")]
    assert (len(received), len(done), len(lines)) == (3, 3, 6)
    assert {line.level for line in done} == {"SUCCESS"}


async def pushed_lines(
    base: str, client: httpx.AsyncClient, send: Callable[[int], Awaitable[None]], count: int
) -> list[dict[str, Any]]:
    """The first ``count`` logLine messages /ws pushes; ``send(n)`` is called again and
    again until the feed (it listens once the socket is open) pushes one."""
    from websockets.asyncio.client import ClientConnection, connect

    async def next_line(ws: ClientConnection) -> dict[str, Any]:
        while (pushed := json.loads(await ws.recv()))["type"] != "logLine":
            pass
        return cast(dict[str, Any], pushed)

    ws_url = base.replace("http", "ws") + "/ws"
    auth = {"Authorization": client.headers["Authorization"]}
    async with connect(ws_url, additional_headers=auth) as ws:
        async with asyncio.timeout(10):
            for n in itertools.count():
                await send(n)
                try:
                    async with asyncio.timeout(0.5):
                        first = await next_line(ws)
                    break
                except TimeoutError:
                    continue
            return [first, *[await next_line(ws) for _ in range(count - 1)]]


async def test_the_websocket_pushes_log_lines(serve: Serve) -> None:
    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)

        async def post(n: int) -> None:
            r = await client.post("/api/v1/logs", json={"job_id": job_id, "message": "[INFO] ws"})
            assert r.status_code == 200

        (pushed,) = await pushed_lines(base, client, post, 1)
    assert pushed["job_id"] == job_id and pushed["message"] == "[INFO] ws"
    assert (pushed["level"], pushed["source"]) == ("INFO", "ingest")


async def test_the_websocket_pushes_each_of_the_lines_sent_together(serve: Serve, bus: Bus) -> None:
    from schemas.ids import utcnow
    from schemas.logs import encode_log_line, log_line

    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)

        async def send_two(n: int) -> None:
            texts = [f"[INFO] {n} first", f"[ERROR] {n} second"]
            lines = [encode_log_line(log_line(job_id, t, utcnow(), "runner_t")) for t in texts]
            await bus.log_nowait(job_id, lines, f"ws {n}")

        first, second = await pushed_lines(base, client, send_two, 2)
    sent = first["message"].split()[1]  # the two lines the feed passed on first
    assert [first["message"], second["message"]] == [
        f"[INFO] {sent} first",
        f"[ERROR] {sent} second",
    ]
    assert (first["level"], second["level"], second["source"]) == ("INFO", "ERROR", "runner_t")


async def test_a_retried_post_with_its_key_is_stored_once(serve: Serve, bus: Bus) -> None:
    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)
        line = {"job_id": job_id, "message": "[INFO] Progress: 10%"}
        key = {"Idempotency-Key": "line-0001"}
        answers = [await client.post("/api/v1/logs", json=line, headers=key) for _ in range(3)]
        assert {r.status_code for r in answers} == {200}
        await client.post("/api/v1/logs", json=line)  # no key: a new line each time
        lines = [s.line async for batch in read_log(bus, job_id, follow=False) for s in batch]
        assert [line.message for line in lines] == ["[INFO] Progress: 10%"] * 2
        progressed = await bus.load(subjects.job_subject(job_id, "JobProgressed"))
        assert len(progressed) == 1
        r = await client.post("/api/v1/logs", json=line, headers={"Idempotency-Key": "a b"})
        assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key"

        # a summary retried after a lost answer is answered as the first time
        summary = {"job_id": job_id, "message": '[SUMMARY] {"status": "success"}'}
        key = {"Idempotency-Key": "summary-1"}
        for _ in range(2):
            r = await client.post("/api/crawler/log", json=summary, headers=key)
            assert r.status_code == 200
            assert r.json() == {"status": "success", "job_id": job_id, "message": RECEIVED}
        r = await client.post("/api/crawler/log", json=summary, headers={"Idempotency-Key": "s-2"})
        assert r.status_code == 404


async def test_a_summary_on_a_job_of_flows_is_only_a_line(
    serve: Serve, bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    base = await serve()
    (tmp_path / "engine").mkdir()
    async with embedded(bus, nats_server.url, tmp_path / "engine", dispatcher=False) as tb:
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=1)])
        async with http(base) as client:
            summary = {"job_id": job_id, "message": '[SUMMARY] {"status": "error"}'}
            assert (await client.post("/api/crawler/log", json=summary)).status_code == 200
            progress = {"job_id": job_id, "message": "[INFO] Progress: 50%"}
            assert (await client.post("/api/crawler/log", json=progress)).status_code == 200
            status = await status_now(client, bus, job_id)
    assert (status["status"], status["kind"], status["progress"]) == ("created", "flows", 0)
    stored = await bus.load(subjects.job_stream_filter(job_id))
    assert [type(env.event).__name__ for env in stored] == ["JobCreated"]


async def test_a_client_that_leaves_the_stream_leaves_no_reader_behind(
    serve: Serve, bus: Bus
) -> None:
    base = await serve(keepalive=0.2)
    deleted = asyncio.Event()

    async def on_deleted(_: object) -> None:
        deleted.set()

    advisory = f"$JS.EVENT.ADVISORY.CONSUMER.DELETED.{subjects.LOGS_STREAM}.*"
    sub = await bus.nc.subscribe(advisory, cb=on_deleted)
    async with http(base) as client:
        job_id = await start_external(client)
        await client.post("/api/v1/logs", json={"job_id": job_id, "message": "[INFO] x"})
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/logs/stream") as stream:
            async with asyncio.timeout(10):
                assert await sse_lines(stream, 1) == ["data: [INFO] x"]
        async with asyncio.timeout(10):  # the stream's reader goes with its client
            await deleted.wait()
    await sub.unsubscribe()
    info = await bus.js.stream_info(subjects.LOGS_STREAM)
    assert info.state.consumer_count == 0


async def test_many_progress_lines_at_once_are_all_taken(serve: Serve, bus: Bus) -> None:
    base = await serve()
    async with http(base) as client:
        job_id = await start_external(client)
        posts = [
            client.post(
                "/api/crawler/log", json={"job_id": job_id, "message": f"[INFO] Progress: {n}%"}
            )
            for n in range(1, 41)
        ]
        answers = await asyncio.gather(*posts)
        assert {r.status_code for r in answers} == {200}
        summary = {"job_id": job_id, "message": '[SUMMARY] {"status": "success"}'}
        assert (await client.post("/api/crawler/log", json=summary)).status_code == 200
        assert (await status_now(client, bus, job_id))["status"] == "completed"
        lines = [s.line async for batch in read_log(bus, job_id, follow=False) for s in batch]
        assert len(lines) == 41


async def test_long_logs_stream_and_download_whole(serve: Serve, bus: Bus) -> None:
    from schemas.ids import utcnow
    from schemas.logs import encode_log_line, log_line

    base = await serve()
    count = 700  # more than one batch of the reader
    singles, together = 400, 50  # lines stored one a message, then 50 a message
    async with http(base) as client:
        job_id = await start_external(client)
        encoded = [
            encode_log_line(log_line(job_id, f"[INFO] line {n}", utcnow(), "runner_t"))
            for n in range(count - 1)
        ]
        for n in range(singles):
            await bus.log_nowait(job_id, encoded[n : n + 1], f"single {n}")
        for n in range(singles, count - 1, together):
            await bus.log_nowait(job_id, encoded[n : n + together], f"together {n}")
        # acked after every line before it on this connection is stored
        await bus.append_log(log_line(job_id, f"[INFO] line {count - 1}", utcnow(), "runner_t"))
        info = await bus.js.stream_info(subjects.LOGS_STREAM)
        assert info.state.messages == singles + 6 + 1  # 299 lines 50 a message, the last
        async with client.stream("GET", f"/api/v1/jobs/{job_id}/logs/stream") as stream:
            async with asyncio.timeout(20):
                lines = await sse_lines(stream, count)
        data = [line for line in lines if line.startswith("data: ")]
        assert data == [f"data: [INFO] line {n}" for n in range(count)]
        async with client.stream("GET", f"/api/crawler/logs/{job_id}") as stream:
            async with asyncio.timeout(20):
                crawler = await sse_lines(stream, count)
        assert [line for line in crawler if line.startswith("data: ")] == data
        running = await client.get(f"/api/v1/jobs/{job_id}/logs?format=jsonl")
        assert len(running.text.splitlines()) == count  # a running job: what TB_LOGS holds

        # an ended job whose log was never saved (no API was running) is saved on demand
        store = await bus.js.object_store(subjects.LOGS_BUCKET)
        await client.post(f"/api/crawler/cancel/{job_id}")
        txt = await client.get(f"/api/v1/jobs/{job_id}/logs")
        assert txt.status_code == 200 and len(txt.text.splitlines()) == count
        saved = await store.get(subjects.saved_log_name(job_id))
        assert len((saved.data or b"").splitlines()) == count
