"""What a real ``tb runner`` process says on its console: one plain line per step and per
flow (JSON when its stderr is not a terminal, as here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli.nats_server import nats_server_path, wait_for_port
from engine.bus import Bus
from schemas.values import Target
from tests.conftest import NatsServer, free_port
from tests.harness import embedded

pytestmark = pytest.mark.timeout(90)

TB = [sys.executable, "-m", "cli.main"]
ENV = {"TB_ACK_WAIT": "3", "TB_PRESENCE_TTL": "3", "TB_LOG_LEVEL": "info"}

Line = dict[str, Any]


class Console:
    """A runner process and the JSON lines it wrote to stderr so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.lines, self.raw = proc, list[Line](), b""

    async def until(self, said: Callable[[Line], bool], timeout: float = 30) -> Line:
        for line in self.lines:
            if said(line):
                return line
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, f"the runner ended; it said: {self.raw.decode()}"
                self.raw += raw
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # not a log line (a library's own output)
                self.lines.append(line)
                if said(line):
                    return line

    def said(self, event: str) -> list[Line]:
        return [line for line in self.lines if line.get("event") == event]


def event(name: str) -> Callable[[Line], bool]:
    return lambda line: line.get("event") == name


async def tb_runner(url: str, *args: str) -> Console:
    proc = await asyncio.create_subprocess_exec(
        *TB, "runner", "--nats-url", url, "--executor", "noop", *args,
        env={**os.environ, **ENV},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Console(proc)


async def test_runner_says_where_it_connects_who_it_is_and_each_flow(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 3
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        console = await tb_runner(
            nats_server.url, "--runner-id", "runner_console", "--slots", "2", "--os", "linux"
        )
        tb.procs.append(console.proc)
        registered = await console.until(event("Registered as runner"))
        job_id = await tb.create_job([Target(url="http://127.0.0.1:9/", flows=flows)])
        await tb.wait_terminal(job_id)
        await console.until(lambda _: len(console.said("Flow finished")) == flows)
        console.proc.send_signal(signal.SIGTERM)
        await console.until(event("Runner stopped"))
        code = await asyncio.wait_for(console.proc.wait(), 30)
    assert code == 0
    said = [line["event"] for line in console.lines]
    assert (
        said.index("Connecting to NATS")
        < said.index("Connected to NATS")
        < said.index("Registered as runner")
    )
    assert console.said("Connecting to NATS")[0]["url"] == nats_server.url
    assert {k: registered[k] for k in ("runner_id", "os", "browser", "slots")} == {
        "runner_id": "runner_console",
        "os": "linux",
        "browser": "chromium",
        "slots": 2,
    }
    assert all(line["level"] == "info" for line in console.lines if "Flow" in line["event"])
    assert [line["job_id"] for line in console.said("Received new job")] == [job_id]
    assert said.index("Received new job") < said.index("Starting job") < said.index("Flow received")
    received = console.said("Flow received")
    finished = console.said("Flow finished")
    ids = {f"{job_id}_0_{n}" for n in range(flows)}
    assert sorted(line["flow_id"] for line in received) == sorted(ids)  # one line each
    assert sorted(line["flow_id"] for line in finished) == sorted(ids)
    assert {line["outcome"] for line in finished} == {"done"}
    assert said.index("Stopping: draining") < said.index("Runner stopped")


@pytest.mark.slow
async def test_runner_retries_an_unreachable_nats_with_back_off_then_registers(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    console = await tb_runner(url)
    server = None
    try:
        await console.until(lambda _: len(console.said("Connection Refused, retrying")) >= 3)
        retries = console.said("Connection Refused, retrying")
        assert [r["attempt"] for r in retries[:3]] == [1, 2, 3]
        assert retries[0]["url"] == url and retries[0]["level"] == "warning"
        server = await asyncio.create_subprocess_exec(
            nats_server_path(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
            str(tmp_path / "js"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await wait_for_port("127.0.0.1", port)
        async with await Bus.connect(url, name="engine") as engine:
            await engine.provision()  # what the engine does at start
        await console.until(event("Registered as runner"), timeout=60)
    finally:
        console.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(console.proc.wait(), 30)
        if server is not None:
            server.kill()
            await server.wait()
    assert code == 0
    # the waits grow (jittered, each between half and all of its ceiling)
    waits = [r["in_seconds"] for r in retries[:3]]
    assert waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0, waits


async def test_runner_whose_credentials_are_refused_says_so_and_stops(tmp_path: Path) -> None:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        nats_server_path(), "-a", "127.0.0.1", "-p", str(port), "--user", "runner",
        "--pass", "right-secret",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_for_port("127.0.0.1", port)
        console = await tb_runner(f"nats://runner:wrong-secret@127.0.0.1:{port}")
        failed = await console.until(event("Authentication Failed, stopping"))
        code = await asyncio.wait_for(console.proc.wait(), 10)
        assert console.proc.stderr is not None
        console.raw += await console.proc.stderr.read()
    finally:
        server.kill()
        await server.wait()
    assert code == 2 and failed["level"] == "error"
    assert console.said("Connection Refused, retrying") == []  # reached, then refused
    assert b"wrong-secret" not in console.raw  # the password never reaches the log
    assert f"nats://runner:***@127.0.0.1:{port}" in failed["reason"]
