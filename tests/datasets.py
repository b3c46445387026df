"""Helpers for dataset tests: uploading a file through the chunked API."""

from __future__ import annotations

import hashlib
from typing import Any

from litestar.testing import AsyncTestClient


async def start(
    client: AsyncTestClient, data: bytes, *, kind: str = "targets", fmt: str = "csv", **extra: Any
) -> dict[str, Any]:
    body = {
        "name": extra.pop("name", "list"),
        "kind": kind,
        "format": fmt,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }
    r = await client.post("/api/v1/datasets/uploads", json=body)
    assert r.status_code == 201, r.text
    started: dict[str, Any] = r.json()
    return started


async def send_chunks(client: AsyncTestClient, upload: dict[str, Any], data: bytes) -> None:
    size = upload["chunk_size"]
    for index in range(upload["chunks"]):
        chunk = data[index * size : (index + 1) * size]
        r = await client.put(
            f"/api/v1/datasets/uploads/{upload['upload_id']}/chunks/{index}", content=chunk
        )
        assert r.status_code == 200, r.text


async def upload(
    client: AsyncTestClient, data: bytes, *, kind: str = "targets", fmt: str = "csv", **extra: Any
) -> tuple[int, dict[str, Any]]:
    """Start, send every chunk, finish: the finish's status and body."""
    started = await start(client, data, kind=kind, fmt=fmt, **extra)
    await send_chunks(client, started, data)
    r = await client.post(f"/api/v1/datasets/uploads/{started['upload_id']}/finish")
    body: dict[str, Any] = r.json()
    return r.status_code, body
