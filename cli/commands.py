"""One coroutine per process kind: engine, api, runner, demo site, replay."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

from cli.logs import announce
from cli.settings import bus_config_from_env
from engine.bus import Bus

log = structlog.get_logger("tb.cli")


def on_stop_signals(stop: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def connect_bus(url: str, name: str) -> Bus:
    announce(f"[INFO] Connecting to NATS: {url}")
    try:
        bus = await Bus.connect(url, name=name, config=bus_config_from_env())
    except Exception as err:
        raise SystemExit(f"Connection Refused: cannot reach NATS at {url} ({err})") from None
    announce("✅ Connected to NATS")
    return bus


async def run_engine(nats_url: str) -> None:
    from engine.advisories import ExhaustedDeliveries
    from engine.dispatcher import Dispatcher

    bus = await connect_bus(nats_url, "tb-engine")
    await bus.provision()
    work = asyncio.gather(Dispatcher(bus).run(), ExhaustedDeliveries(bus).run())
    on_stop_signals(work.cancel)
    announce("✅ Engine running (dispatcher, exhausted-delivery watch)")
    try:
        await work
    except asyncio.CancelledError:
        pass
    finally:
        await bus.close()


async def run_api(nats_url: str, host: str, port: int, db_path: Path) -> None:
    import uvicorn

    from api.app import create_app
    from api.services import ApiConfig

    db_path.parent.mkdir(parents=True, exist_ok=True)
    app = create_app(ApiConfig(nats_url=nats_url, db_path=db_path, bus=bus_config_from_env()))
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="auto")
    )
    announce(f"✅ API and dashboard on http://{host}:{port}/")
    await server.serve()


async def run_runner(
    nats_url: str,
    *,
    api_url: str | None,
    os_name: str,
    browser: str,
    slots: int,
    executor_kind: str,
    runner_id: str | None,
    headless: bool,
    screenshot_dir: Path | None,
) -> None:
    from agents.executor import FlowExecutor, NoopExecutor
    from agents.playwright_flow import PlaywrightExecutor
    from agents.runner import Runner
    from schemas import VERSION
    from schemas.values import Platform

    if api_url:
        announce(f"[INFO] Connecting to Backend: {api_url}")
    bus = await connect_bus(nats_url, "tb-runner")
    executor: FlowExecutor
    if executor_kind == "noop":
        executor = NoopExecutor()
    else:
        executor = PlaywrightExecutor(VERSION, headless=headless, screenshot_dir=screenshot_dir)
    platform = Platform(os=os_name, browser=browser)  # type: ignore[arg-type]
    runner = Runner(bus, executor, platform=platform, slots=slots, announce=announce)
    if runner_id:
        runner.runner_id = runner_id
    on_stop_signals(runner.stop)
    try:
        await runner.run()
    finally:
        await bus.close()


async def run_demo_site(host: str, port: int, token_file: Path) -> None:
    from demo.site import serve_demo_site

    announce(f"✅ Demo site on http://{host}:{port}/")
    await serve_demo_site(host, port, token_file)


async def run_replay(nats_url: str, db_path: Path, verify: bool) -> int:
    from projections.replay import dump_tables, rebuild

    bus = await connect_bus(nats_url, "tb-replay")
    try:
        total = await bus.last_seq()
        bar = ProgressBar("replay", total)
        if verify:
            scratch = db_path.with_suffix(".verify.db")
            await rebuild(bus, scratch, progress=bar.update)
            bar.finish()
            same = db_path.exists() and await dump_tables(scratch) == await dump_tables(db_path)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{scratch}{suffix}").unlink()
            print("read model matches the event log" if same else "read model DIFFERS from the log")
            return 0 if same else 1
        last = await rebuild(bus, db_path, progress=bar.update)
        bar.finish()
        print(f"rebuilt {db_path} from the event log up to sequence {last}")
        return 0
    finally:
        await bus.close()


class ProgressBar:
    """A plain-text progress bar on stderr (no terminal tricks beyond carriage return)."""

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(total, 0), width
        self._last = ""

    def update(self, done: int, total: int | None = None, suffix: str = "") -> None:
        if total is not None:
            self.total = total
        frac = min(1.0, done / self.total) if self.total else 1.0
        filled = int(frac * self.width)
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{self.total} {suffix}"
        )
        if line != self._last:
            sys.stderr.write(line)
            sys.stderr.flush()
            self._last = line

    def finish(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
