"""The ``tb`` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from cli.nats_server import port_is_open
from tests.conftest import free_port

TB = [sys.executable, "-m", "cli.main"]


def test_schema_lists_every_event() -> None:
    out = subprocess.run([*TB, "schema"], check=True, capture_output=True, text=True).stdout
    defs = json.loads(out)["$defs"]
    for name in (
        "JobCreated",
        "JobRefused",
        "FlowDispatched",
        "FlowDone",
        "ConsentGiven",
        "RunnerRegistered",
    ):
        assert name in defs


def test_bad_flags_exit_2_naming_the_flag() -> None:
    result = subprocess.run([*TB, "up", "--port", "0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--port" in result.stderr and "1-65535" in result.stderr
    result = subprocess.run(
        [*TB, "runner", "--nats-url", "localhost"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--nats-url" in result.stderr


async def test_up_runs_the_demo_job_counting_every_flow_once(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *TB,
        "up",
        "--port",
        str(port),
        "--nats-port",
        str(nats_port),
        "--demo-port",
        str(free_port()),
        "--state-dir",
        str(tmp_path / "tb"),
        "--exit-when-done",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "20/20 flows done, 0 failed" in text
    assert "every flow counted exactly once" in text
    assert not port_is_open("127.0.0.1", port) and not port_is_open("127.0.0.1", nats_port)


async def test_up_stops_every_process_on_sigterm(tmp_path: Path) -> None:
    port, nats_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        *TB,
        "up",
        "--no-demo",
        "--port",
        str(port),
        "--nats-port",
        str(nats_port),
        "--state-dir",
        str(tmp_path / "tb"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(120):
        while "Press Ctrl-C to stop." not in "".join(lines):
            line = await proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line.decode())
    assert port_is_open("127.0.0.1", port) and port_is_open("127.0.0.1", nats_port)
    proc.send_signal(signal.SIGTERM)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, "".join(lines) + rest.decode()
    assert "Stopped." in rest.decode()
    assert not port_is_open("127.0.0.1", port) and not port_is_open("127.0.0.1", nats_port)
    leftovers = subprocess.run(
        ["pgrep", "-f", "--", rf"(--nats-port |:){nats_port}\b"], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == []


def test_up_refuses_a_port_in_use_naming_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*TB, "up", "--port", str(port), "--nats-port", str(free_port()),
             "--state-dir", str(tmp_path / "tb")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"--port {port}: already in use" in result.stderr


async def test_runner_says_connection_refused_and_keeps_retrying(tmp_path: Path) -> None:
    from cli.nats_server import start_nats_server
    from engine.bus import Bus

    port = free_port()
    runner = await asyncio.create_subprocess_exec(
        *TB, "runner", "--nats-url", f"nats://127.0.0.1:{port}", "--executor", "noop",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert runner.stderr is not None
    nats = None
    try:
        async with asyncio.timeout(60):
            seen = ""
            while "Connection Refused" not in seen:
                seen += (await runner.stderr.readline()).decode()
            assert runner.returncode is None
            nats = await start_nats_server(port, tmp_path / "js")
            while "Waiting for the engine" not in seen:
                seen += (await runner.stderr.readline()).decode()
            async with await Bus.connect(f"nats://127.0.0.1:{port}", name="engine") as bus:
                await bus.provision()  # what the engine does at start
            while "Registered as runner" not in seen:
                line = await runner.stderr.readline()
                assert line, seen
                seen += line.decode()
    finally:
        runner.send_signal(signal.SIGTERM)
        await asyncio.wait_for(runner.wait(), 30)
        if nats is not None:
            nats.kill()
            await nats.wait()
