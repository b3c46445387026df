"""``tb up``: the whole system in one process tree on embedded defaults (DESIGN §2)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cli.commands import ProgressBar
from cli.http import call
from cli.logs import announce
from cli.nats_server import port_is_open, start_nats_server
from cli.settings import bus_config_from_env
from engine.bus import Bus
from schemas import subjects
from schemas.events import FlowDone

DEMO_HOST = "127.0.0.1"
TERMINAL = {"completed", "failed", "cancelled", "refused"}


class StartupFailed(Exception):
    """A process died or the system did not become ready; the message says where to look."""


@dataclass
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    nats_port: int = 4222
    state_dir: Path = Path(".tb")
    runners: int = 1
    slots: int = 2
    demo: bool = True
    demo_port: int | None = None
    exit_when_done: bool = False
    executor: str = "playwright"


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: IO[bytes]


@dataclass
class ProcessTree:
    state_dir: Path
    children: list[Child] = field(default_factory=list)

    async def spawn(self, name: str, *args: str) -> Child:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            *args,
            stdout=out,
            stderr=out,
            start_new_session=True,  # Ctrl-C reaches us once; we stop children in order
        )
        child = Child(name, proc, out)
        self.children.append(child)
        return child

    async def first_exit(self) -> Child:
        waits = {asyncio.create_task(c.proc.wait()): c for c in self.children}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every child at once (each stops cleanly on its own), SIGKILL after grace."""
        for child in self.children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._reap(child, grace) for child in self.children))

    async def _reap(self, child: Child, grace: float) -> None:
        try:
            await asyncio.wait_for(child.proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
        child.log.close()


def _check_ports(options: UpOptions, demo_port: int) -> None:
    wanted = [
        ("--port", options.host, options.port),
        ("--nats-port", "127.0.0.1", options.nats_port),
    ]
    if options.demo:
        wanted.append(("--demo-port", DEMO_HOST, demo_port))
    for flag, host, port in wanted:
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if port_is_open(probe, port):
            raise SystemExit(f"{flag} {port}: already in use on {probe}; choose another port")


async def up(options: UpOptions) -> int:
    """Start everything, run the demo, serve until Ctrl-C/SIGTERM or a child dies."""
    state = options.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    demo_port = options.demo_port or options.port + 1
    _check_ports(options, demo_port)
    started = time.monotonic()
    (state / "logs").mkdir(exist_ok=True)
    nats = await start_nats_server(
        options.nats_port, state / "jetstream", log_file=state / "logs" / "nats.log"
    )
    system = System(options, state, demo_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await system.start_processes()
        session = asyncio.create_task(system.session(started))
        stopping = asyncio.create_task(stop.wait())
        dying = asyncio.create_task(system.tree.first_exit())
        pending: set[asyncio.Task[Any]] = {session, stopping, dying}
        code = 0
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                code = code if session.done() else 130
                break
            if dying in done:
                child = dying.result()
                announce(f"{child.name} exited with {child.proc.returncode}; stopping (see logs)")
                code = 1
                break
            if session in done:
                try:
                    code = session.result()
                except StartupFailed as err:
                    announce(str(err))
                    code = 1
                    break
                if options.exit_when_done:
                    break
                announce("Press Ctrl-C to stop.")
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return code
    finally:
        announce("Stopping…")
        await system.close()
        if nats.returncode is None:
            nats.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(nats.wait(), 10)
            except TimeoutError:
                nats.kill()
        announce("Stopped.")


@dataclass
class System:
    """The embedded process tree and what `tb up` does with it."""

    options: UpOptions
    state: Path
    demo_port: int
    tree: ProcessTree = field(init=False)
    bus: Bus | None = None

    def __post_init__(self) -> None:
        self.tree = ProcessTree(self.state)
        self.nats_url = f"nats://127.0.0.1:{self.options.nats_port}"
        host = self.options.host
        self.api_url = (
            f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.options.port}"
        )
        self.demo_url = f"http://{DEMO_HOST}:{self.demo_port}"
        self.token_file = self.state / "demo" / "trafficbuster.txt"

    async def start_processes(self) -> None:
        o = self.options
        self.bus = await Bus.connect(self.nats_url, name="tb-up", config=bus_config_from_env())
        await self.bus.provision()
        await self.bus.ensure_dispatch_consumer("linux", "chromium")
        nats = ("--nats-url", self.nats_url)
        await self.tree.spawn("engine", "engine", *nats)
        db = str(self.state / "read.db")
        await self.tree.spawn(
            "api", "api", *nats, "--host", o.host, "--port", str(o.port), "--db", db
        )
        if o.demo:
            self.token_file.parent.mkdir(parents=True, exist_ok=True)
            await self.tree.spawn(
                "demo-site", "demo-site", "--host", DEMO_HOST, "--port", str(self.demo_port),
                "--token-file", str(self.token_file),
            )  # fmt: skip
        for n in range(o.runners):
            await self.tree.spawn(
                f"runner-{n + 1}", "runner", *nats, "--api", self.api_url,
                "--slots", str(o.slots), "--executor", o.executor,
                "--screenshot-dir", str(self.state / "screenshots"),
            )  # fmt: skip

    async def session(self, started: float) -> int:
        """Wait for readiness, print where everything is, run the demo (0 = all good)."""
        await _until_ready(self.api_url, self.tree, timeout=90)
        announce(f"TrafficBuster is up in {time.monotonic() - started:.1f}s")
        announce(f"  dashboard  {self.api_url}/")
        announce(f"  API docs   {self.api_url}/schema")
        announce(f"  NATS       {self.nats_url}  (e.g. nats sub 'tb.>' -s {self.nats_url})")
        announce(f"  logs       {self.state / 'logs'}")
        announce("  login      none yet: the embedded mode listens on loopback only")
        if not self.options.demo or self.bus is None:
            return 0
        ok = await run_demo(self.api_url, self.demo_url, self.token_file, self.bus, self.options)
        return 0 if ok else 1

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()
        await self.tree.stop()


async def _until_ready(api_url: str, tree: ProcessTree, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for child in tree.children:
            if child.proc.returncode is not None:
                raise StartupFailed(
                    f"{child.name} exited with {child.proc.returncode} during start-up; "
                    f"see {tree.state_dir / 'logs' / (child.name + '.log')}"
                )
        with contextlib.suppress(OSError):
            status, body = await call("GET", f"{api_url}/readyz", timeout=2)
            if status == 200:
                return
            last = body
        await asyncio.sleep(0.25)
    raise StartupFailed(f"not ready after {timeout:.0f}s: {last}")


async def run_demo(
    api_url: str, demo_url: str, token_file: Path, bus: Bus, options: UpOptions
) -> bool:
    """Prove consent through the real path, run a job of 20+ flows, show progress."""
    status, claimed = await call("POST", f"{api_url}/api/v1/consents", {"domain": DEMO_HOST})
    if status != 201:
        announce(f"demo: claim failed: {claimed}")
        return False
    token_file.write_text(claimed["token"] + "\n", encoding="utf-8")
    status, verified = await call(
        "POST", f"{api_url}/api/v1/consents/{DEMO_HOST}/verify", {"base_url": demo_url}
    )
    if status != 200:
        announce(f"demo: verification failed: {verified}")
        return False
    announce(f"demo: consent for {DEMO_HOST} verified via {verified['evidence']}")
    job = {
        "name": "demo: browse the bundled shop",
        "targets": [
            {"url": f"{demo_url}/", "flows": 8, "clicks": 2},
            {"url": f"{demo_url}/products", "flows": 6, "clicks": 2},
            {"url": f"{demo_url}/about", "flows": 6, "clicks": 1},
        ],
        "settings": {"instance_count": options.runners * options.slots, "session_seconds": 1.0},
    }
    status, created = await call("POST", f"{api_url}/api/v1/jobs", job)
    if status != 201:
        announce(f"demo: job refused by the API: {created}")
        return False
    job_id = created["job_id"]
    announce(f"demo: job {job_id} created")
    bar = ProgressBar("demo", 20)
    view: Any = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status, view = await call("GET", f"{api_url}/api/v1/jobs/{job_id}?min_seq={created['seq']}")
        if status == 200:
            finished = view["flows_done"] + view["flows_failed"]
            bar.update(finished, view["flows_total"] or 20, view["status"])
            if view["status"] in TERMINAL:
                break
        await asyncio.sleep(0.5)
    bar.finish()
    if not view or view.get("status") != "completed":
        announce(f"demo: job ended as {view and view.get('status')}: {view and view.get('reason')}")
        return False
    distinct, events = await _flow_done_in_stream(bus, job_id)
    counted_once: bool = distinct == view["flows_done"]
    announce(
        f"demo: {view['flows_done']}/{view['flows_total']} flows done, "
        f"{view['flows_failed']} failed; the stream holds FlowDone for {distinct} distinct "
        f"flows ({events} events) — "
        + ("every flow counted exactly once" if counted_once else "COUNT MISMATCH")
    )
    return counted_once


async def _flow_done_in_stream(bus: Bus, job_id: str) -> tuple[int, int]:
    flows: set[str] = set()
    events = 0
    async for batch in bus.read(1, subjects.flow_subject(job_id, "FlowDone"), follow=False):
        for env in batch:
            if isinstance(env.event, FlowDone):
                flows.add(env.event.flow_id)
                events += 1
    return len(flows), events
