"""``just bench-import``: a 1M-row targets csv through our path against the csv module.

Our path is the product's: a real ``tb api`` process on a real nats-server, the file
sent with ``tb dataset upload``'s client in chunks (start, chunks, finish), the finish
assembling, checking the sha256, parsing and validating every row, dropping duplicates
and storing the version in the object store. The baseline is the plain csv module
reading the same file in the same run, doing nothing with the rows. Printed: rows per
second of each, their ratio, and the API process's peak resident memory (VmHWM; goal:
under 300 MB, the file is streamed, never held whole).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import secrets
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cli import datasets
from cli.nats_server import start_nats_server_on_any_port, wait_for_port
from tests.conftest import free_port

RSS_GOAL = 300 * 1024 * 1024


def write_targets(path: Path, rows: int) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["ID", "URL", "Type", "Source", "Keyword", "flowTarget", "clickTarget"])
        for n in range(rows):
            out.writerow(
                [n, f"https://shop{n % 97}.example/p/{n}", "landing", "mail", f"kw{n % 13}", 1, 0]
            )


def plain_csv(path: Path) -> tuple[int, float]:
    began = time.perf_counter()
    with path.open(newline="") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return rows, time.perf_counter() - began


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def log_in(port: int, password: str) -> str:
    body = json.dumps({"username": "admin", "password": password}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/auth/login",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        token: str = json.loads(response.read())["token"]
    return token


async def main(rows: int, within: float) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-bench-import-") as tmp:
        root = Path(tmp)
        source = root / "targets.csv"
        write_targets(source, rows)
        size = source.stat().st_size
        print(f"file: {rows:,} rows, {size / 2**20:.1f} MiB")
        counted, csv_seconds = plain_csv(source)
        assert counted == rows
        nats, nats_port = await start_nats_server_on_any_port(root / "js")
        password = secrets.token_urlsafe()
        port = free_port()
        api = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "api",
            "--nats-url", f"nats://127.0.0.1:{nats_port}", "--port", str(port),
            "--db", str(root / "read.db"),
            env={**os.environ, "TB_LOG_LEVEL": "warning", "TB_ADMIN_PASSWORD": password},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await wait_for_port("127.0.0.1", port, timeout=60)
            # the upload client sends what TB_API_TOKEN holds: the first admin's session
            os.environ["TB_API_TOKEN"] = await asyncio.to_thread(log_in, port, password)
            before = memory_kib(api.pid, "VmRSS:")
            began = time.perf_counter()
            async with asyncio.timeout(within):
                finished = await asyncio.to_thread(
                    datasets.upload, f"http://127.0.0.1:{port}", source, "targets", "bench",
                    root / "state",
                )  # fmt: skip
            ours_seconds = time.perf_counter() - began
            peak = memory_kib(api.pid, "VmHWM:")
        finally:
            api.terminate()
            await api.wait()
            nats.kill()
            await nats.wait()
        assert finished["rows"] == rows, finished
        ours, baseline = rows / ours_seconds, rows / csv_seconds
        print(
            f"csv module reading the file (baseline): {baseline:,.0f} rows/s ({csv_seconds:.2f} s)"
        )
        print(
            f"tb api upload + finish (parse, validate, dedupe, store): {ours:,.0f} rows/s"
            f" ({ours_seconds:.1f} s)"
        )
        print(f"ratio ours : baseline = {ours / baseline:.4f} (1 : {baseline / ours:.0f})")
        verdict = "met" if peak * 1024 < RSS_GOAL else "MISSED"
        print(
            f"tb api RSS: {before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB"
            f" (goal under {RSS_GOAL / 2**20:.0f} MiB: {verdict})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the upload may take")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.timeout))
