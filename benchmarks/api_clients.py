"""The clients of ``benchmarks.api``, in their own process so they do not share the API's
interpreter: HTTP readers on kept-alive connections, and WebSocket listeners.

Each mode prints one JSON line with what it measured on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

from websockets.asyncio.client import connect


async def http_reader(
    host: str,
    port: int,
    path: str,
    deadline: float,
    budget: list[int],
    latencies: list[float],
    key: str,
) -> int:
    """GET ``path`` again and again on one kept-alive connection; returns the errors seen."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
        f"X-API-Key: {key}\r\n\r\n"
    ).encode()
    errors = 0
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if b" 200 " not in status_line:
                errors += 1
    finally:
        writer.close()
    return errors


async def http_mode(
    url: str, clients: int, requests: int, seconds: float, key: str
) -> dict[str, object]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    deadline = time.perf_counter() + seconds
    budget, latencies = [requests], []  # type: ignore[var-annotated]
    started = time.perf_counter()
    errors = await asyncio.gather(
        *(
            http_reader(
                parts.hostname or "", parts.port or 80, path, deadline, budget, latencies, key
            )
            for _ in range(clients)
        )
    )
    elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": sum(errors), "elapsed": elapsed}


async def ws_mode(
    url: str, sockets: int, job_id: str, pushes: int, seconds: float, key: str
) -> dict[str, object]:
    """Open ``sockets`` listeners, say ``ready``, then record when each receives the
    progressUpdate of ``job_id`` with ``success`` = 1 … ``pushes``."""
    received: dict[int, list[float]] = {n: [] for n in range(1, pushes + 1)}
    connections = []
    for _ in range(sockets):
        connections.append(
            await connect(
                url, max_queue=None, open_timeout=30, additional_headers={"X-API-Key": key}
            )
        )
    print("ready", flush=True)

    async def listen(ws: object) -> None:
        seen = 0
        async for message in ws:  # type: ignore[attr-defined]
            at = time.time()
            update = json.loads(message)
            if update.get("type") != "progressUpdate" or update.get("job_id") != job_id:
                continue
            success = int(update["success"])
            if success in received and success > seen:
                received[success].append(at)
                seen = success
            if seen >= pushes:
                return

    try:
        async with asyncio.timeout(seconds):
            await asyncio.gather(*(listen(ws) for ws in connections))
    except TimeoutError:
        pass
    finally:
        await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    return {"received": {str(n): times for n, times in received.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    http = sub.add_parser("http")
    http.add_argument("--url", required=True)
    http.add_argument("--clients", type=int, default=100)
    http.add_argument("--requests", type=int, default=10_000)
    http.add_argument("--seconds", type=float, default=60)
    http.add_argument("--api-key", required=True)
    ws = sub.add_parser("ws")
    ws.add_argument("--url", required=True)
    ws.add_argument("--sockets", type=int, default=500)
    ws.add_argument("--job", required=True)
    ws.add_argument("--pushes", type=int, default=20)
    ws.add_argument("--seconds", type=float, default=120)
    ws.add_argument("--api-key", required=True)
    a = parser.parse_args()
    if a.mode == "http":
        result = asyncio.run(http_mode(a.url, a.clients, a.requests, a.seconds, a.api_key))
    else:
        result = asyncio.run(ws_mode(a.url, a.sockets, a.job, a.pushes, a.seconds, a.api_key))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
