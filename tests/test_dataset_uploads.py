"""Chunked uploads end to end with a real nats-server: chunks sent twice, an upload
interrupted on one API replica and resumed on another, body limits of their own."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from engine.bus import Bus
from engine.datasets.uploads import UploadsConfig
from schemas import subjects
from tests.api_client import api_config, key_in
from tests.conftest import NatsServer
from tests.datasets import send_chunks, start


@asynccontextmanager
async def replica(
    nats_server: NatsServer, tmp_path: Path, name: str, chunk_size: int
) -> AsyncIterator[AsyncTestClient]:
    config = api_config(
        nats_server, tmp_path, db_path=tmp_path / f"{name}.db",
        uploads=UploadsConfig(chunk_size=chunk_size),
    )  # fmt: skip
    async with AsyncTestClient(app=create_app(config)) as client:
        await key_in(client)
        yield client


def targets_csv(rows: int) -> bytes:
    lines = [b"ID,URL,Source,Keyword,flowTarget,clickTarget"]
    row = b"%d,https://shop%d.example/p/%d,mailing,kw%d,1,0"
    lines += [row % (n, n % 97, n, n % 13) for n in range(rows)]
    return b"\n".join(lines) + b"\n"


async def interrupted_and_resumed(
    nats_server: NatsServer, tmp_path: Path, data: bytes, chunk_size: int
) -> dict[str, Any]:
    """Replica A gets the first half of the chunks (one of them twice) and is gone;
    replica B sees what is missing, sends it, and finishes."""
    async with replica(nats_server, tmp_path, "a", chunk_size) as a:
        upload = await start(a, data)
        chunks = upload["chunks"]
        assert chunks >= 4
        url = f"/api/v1/datasets/uploads/{upload['upload_id']}"
        for index in [*range(chunks // 2), 1]:  # chunk 1 twice
            chunk = data[index * chunk_size : (index + 1) * chunk_size]
            r = await a.put(f"{url}/chunks/{index}", content=chunk)
            assert r.status_code == 200, r.text
    async with replica(nats_server, tmp_path, "b", chunk_size) as b:
        view = (await b.get(url)).json()
        assert view["received"] == list(range(chunks // 2))
        assert view["missing"] == list(range(chunks // 2, chunks))
        for index in view["missing"]:
            chunk = data[index * chunk_size : (index + 1) * chunk_size]
            assert (await b.put(f"{url}/chunks/{index}", content=chunk)).status_code == 200
        finished = await b.post(f"{url}/finish")
        assert finished.status_code == 201, finished.text
        body: dict[str, Any] = finished.json()
        return body


async def test_an_upload_interrupted_on_one_replica_is_finished_on_another(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = targets_csv(5_000)  # about 300 KB
    body = await interrupted_and_resumed(nats_server, tmp_path, data, chunk_size=64 * 1024)
    assert body["rows"] == 5_000 and body["warnings"] == []


@pytest.mark.slow
async def test_a_50_mb_csv_arrives_in_chunks_with_the_right_row_count(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = targets_csv(1_000_000)
    assert len(data) > 50 * 1024 * 1024
    began = time.monotonic()
    body = await interrupted_and_resumed(nats_server, tmp_path, data, chunk_size=8 * 1024 * 1024)
    assert body["rows"] == 1_000_000 and body["warnings"] == []
    print(f"50 MB csv, 1M rows: uploaded and stored in {time.monotonic() - began:.1f} s")


async def test_chunks_have_their_own_body_limit(nats_server: NatsServer, tmp_path: Path) -> None:
    chunk_size = 256 * 1024  # far past the JSON body limit (32 KiB)
    data = targets_csv(20_000)
    async with replica(nats_server, tmp_path, "a", chunk_size) as client:
        upload = await start(client, data)
        url = f"/api/v1/datasets/uploads/{upload['upload_id']}/chunks"
        ok = await client.put(f"{url}/0", content=data[:chunk_size])
        assert ok.status_code == 200, ok.text
        too_big = await client.put(f"{url}/1", content=data[: chunk_size + 1])
        assert too_big.status_code == 413, too_big.text
        json_body = await client.post(
            "/api/v1/datasets/uploads",
            json={"name": "x" * 40_000, "kind": "targets", "format": "csv", "size": 1,
                  "sha256": hashlib.sha256(b"").hexdigest()},
        )  # fmt: skip
        assert json_body.status_code == 413


async def test_two_replicas_finishing_one_upload_store_one_version(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = targets_csv(2_000)
    async with (
        replica(nats_server, tmp_path, "a", 16 * 1024) as a,
        replica(nats_server, tmp_path, "b", 16 * 1024) as b,
    ):
        upload = await start(a, data)
        await send_chunks(b, upload, data)
        url = f"/api/v1/datasets/uploads/{upload['upload_id']}/finish"
        first, second = await asyncio.gather(a.post(url), b.post(url))
        assert first.status_code == second.status_code == 201, (first.text, second.text)
        assert first.json()["dataset_id"] == second.json()["dataset_id"]
        assert first.json()["version"] == second.json()["version"] == 1
        async with await Bus.connect(nats_server.url, name="test") as bus:
            events = await bus.load(subjects.dataset_stream_filter(first.json()["dataset_id"]))
        assert [type(e.event).__name__ for e in events] == [
            "DatasetCreated",
            "DatasetVersionUploaded",
        ]


async def test_the_api_sweeps_an_idle_upload_away_with_its_chunks(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = api_config(
        nats_server, tmp_path, uploads=UploadsConfig(chunk_size=4, lifetime=1.0, sweep_every=0.2)
    )
    async with (
        AsyncTestClient(app=create_app(config)) as client,
        await Bus.connect(nats_server.url, name="test") as bus,
    ):
        await key_in(client)
        upload = await start(client, b"http://a.example/\n", fmt="txt")
        url = f"/api/v1/datasets/uploads/{upload['upload_id']}"
        assert (await client.put(f"{url}/chunks/0", content=b"http")).status_code == 200
        kv = await bus.kv(subjects.UPLOADS_BUCKET)
        watcher = await kv.watch(upload["upload_id"])
        try:
            async with asyncio.timeout(10):
                async for entry in watcher:
                    if entry is not None and entry.operation is not None:
                        break  # the entry was purged
        finally:
            await watcher.stop()
        assert (await client.get(url)).status_code == 404
        info = await bus.js.stream_info(f"OBJ_{subjects.UPLOADS_BUCKET}")
        assert info.state.messages == 0


async def test_an_unreadable_upload_record_answers_404_not_500(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data = targets_csv(10)
    async with replica(nats_server, tmp_path, "a", 64 * 1024) as client:
        upload = await start(client, data)
        upload_id = upload["upload_id"]
        async with await Bus.connect(nats_server.url, name="test") as bus:
            kv = await bus.kv(subjects.UPLOADS_BUCKET)
            await kv.put(upload_id, b"{garbage")
        url = f"/api/v1/datasets/uploads/{upload_id}"
        for answer in (
            await client.get(url),
            await client.put(f"{url}/chunks/0", content=data),
            await client.post(f"{url}/finish"),
        ):
            assert answer.status_code == 404, answer.text
            assert "upload_id" in answer.text and "unreadable" in answer.text
