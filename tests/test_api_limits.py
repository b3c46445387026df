"""Request bodies are bounded: a body over the limit is a 413 naming the body, however it
is sent (with a length, or streamed in chunks without one), and nothing is stored."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path

import uvicorn

from api.app import create_app
from api.services import ApiConfig
from cli.nats_server import wait_for_port
from engine.bus import Bus
from tests.api_client import TEST_IDENTITY, bearer
from tests.conftest import NatsServer, free_port


def post_chunked(
    port: int, path: str, chunks: list[bytes], headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        for chunk in chunks:
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_a_body_over_the_limit_is_a_413_with_a_length_or_streamed(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    config = ApiConfig(
        identity=TEST_IDENTITY,
        nats_url=nats_server.url,
        db_path=tmp_path / "read.db",
        body_limit=4096,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    before = await bus.last_seq()
    try:
        await wait_for_port("127.0.0.1", port, timeout=20)
        auth = await bearer(f"http://127.0.0.1:{port}")
        before = await bus.last_seq()  # the first admin and their login are stored
        big = b'{"domain": "' + b"a" * 5000 + b'.example"}'
        for path in ("/api/v1/consents", "/api/v1/jobs", "/api/v1/proxies"):
            streamed = [big[i : i + 1000] for i in range(0, len(big), 1000)]
            for chunks in ([big], streamed):
                status, body = await asyncio.to_thread(post_chunked, port, path, chunks, auth)
                assert status == 413, (path, body)
                assert body["field"] == "body", body
        small = [b'{"domain": ', b'"example.com"}']
        status, body = await asyncio.to_thread(post_chunked, port, "/api/v1/consents", small, auth)
        assert status == 201, body
    finally:
        server.should_exit = True
        await serving
    assert await bus.last_seq() == before + 1  # only the small claim was stored
