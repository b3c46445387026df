"""A runner process whose flows sleep instead of browsing, for tests that kill runners.

``python -m tests.runner_proc --nats-url URL --seconds S --slots N --record FILE``
appends one JSON line per executor run to FILE as it starts and as it ends (done or
cancelled), with wall-clock times, so a test can tell what ran when even in a runner
it SIGKILLed. SIGTERM drains it (TB_DRAIN_GRACE), as it does ``tb runner``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import IO

import msgspec

from agents.executor import AllowedHosts, FlowReport, FlowResult
from agents.runner import Runner
from cli.logs import configure_logging
from cli.settings import bus_config_from_env, drain_grace_from_env
from engine.bus import Bus
from schemas.events import FlowDispatched


class Run(msgspec.Struct):
    runner: str
    flow_id: str
    job_id: str
    attempt: int
    started: float
    ended: float | None = None
    how: str = ""  # "done" or "cancelled"; "" in the line written when it starts


class SleepingExecutor:
    def __init__(self, seconds: float, runner: str, record: IO[bytes]) -> None:
        self.seconds, self.runner, self.record = seconds, runner, record

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _write(self, run: Run) -> None:
        self.record.write(msgspec.json.encode(run) + b"\n")
        self.record.flush()

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        run = Run(self.runner, item.flow_id, item.job_id, item.attempt, time.time())
        self._write(run)
        try:
            end = time.monotonic() + self.seconds
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(left, 1.0))
                await report.keepalive()
        except asyncio.CancelledError:
            run.ended, run.how = time.time(), "cancelled"
            self._write(run)
            raise
        run.ended, run.how = time.time(), "done"
        self._write(run)
        return FlowResult(clicks_done=item.clicks, pages=1)


def read_runs(path: Path) -> list[Run]:
    """Every run a record file holds, a started-only line replaced by its end when there is one."""
    runs: dict[tuple[str, str, int, float], Run] = {}
    if not path.exists():
        return []
    for line in path.read_bytes().splitlines():
        try:
            run = msgspec.json.decode(line, type=Run)
        except msgspec.DecodeError:
            continue  # a line cut short by SIGKILL
        runs[(run.runner, run.flow_id, run.attempt, run.started)] = run
    return list(runs.values())


async def main(url: str, seconds: float, slots: int, runner_id: str, record: Path) -> None:
    bus = await Bus.connect(url, name=runner_id, config=bus_config_from_env())
    with record.open("ab") as out:
        executor = SleepingExecutor(seconds, runner_id, out)
        runner = Runner(bus, executor, slots=slots, drain_grace=drain_grace_from_env())
        runner.runner_id = runner_id
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, runner.stop)
        try:
            await runner.run()
        finally:
            await bus.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--nats-url", required=True)
    p.add_argument("--seconds", type=float, default=0.5)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--runner-id", required=True)
    p.add_argument("--record", type=Path, required=True)
    a = p.parse_args()
    configure_logging()
    asyncio.run(main(a.nats_url, a.seconds, a.slots, a.runner_id, a.record))
