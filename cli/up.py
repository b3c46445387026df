"""``tb up``: the whole system in one process tree on embedded defaults (DESIGN §2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agents.runner import RELEASE_GRACE
from cli.commands import ProgressBar, consumer_settings_message
from cli.http import call
from cli.logs import announce
from cli.nats_auth import AUDITOR, OPS, EmbeddedAuthorization, local_runner_id
from cli.nats_server import nats_server_config_args, port_is_open, wait_for_port
from cli.secrets import refuse_placeholder
from cli.settings import (
    bus_config_from_env,
    drain_grace_from_env,
    open_bind_warning,
)
from cli.state_dir import StateDir, StateDirBusy
from cli.supervise import Backoff
from engine.bus import Bus, ConsumerSettingsRefused
from engine.identity.passwords import MIN_LENGTH as PASSWORD_MIN_LENGTH
from schemas import subjects
from schemas.events import FlowDone
from schemas.values import TERMINAL_JOB_STATUSES, JobStatus

DEMO_HOST = "127.0.0.1"
STOP_GRACE = 10.0  # seconds a stopping child gets before SIGKILL (runners: their drain too)


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
    """One process of the tree; ``proc`` is its current incarnation."""

    name: str
    argv: list[str]
    log_path: Path
    last: bool = False  # stopped after the others (nats-server: they need it to stop cleanly)
    stop_grace: float = STOP_GRACE  # seconds from SIGTERM to SIGKILL
    proc: asyncio.subprocess.Process | None = None
    log: IO[bytes] | None = None
    started_at: float = 0.0
    exits: int = 0  # exits since `tb up` started, restarts included
    backoff: Backoff = field(default_factory=Backoff)
    env: dict[str, str] = field(default_factory=dict)  # on top of ours: its NATS credentials

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode


@dataclass
class ProcessTree:
    """Starts the children and keeps them running: a child that exits is restarted with
    capped, jittered back-off (DESIGN §1.8) until ``stop()``. Each child's pid is in
    ``<state-dir>/pids/<name>.pid``, its output in ``<state-dir>/logs/<name>.log``."""

    state: StateDir
    announce: Callable[[str], None] = announce
    backoff: Callable[[], Backoff] = Backoff  # one per child
    children: list[Child] = field(default_factory=list)
    _watchers: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    async def spawn(
        self,
        name: str,
        *args: str,
        stop_grace: float = STOP_GRACE,
        env: dict[str, str] | None = None,
    ) -> Child:
        """A ``tb <args>`` child."""
        argv = [sys.executable, "-m", "cli.main", *args]
        return await self.spawn_exec(name, argv, stop_grace=stop_grace, env=env)

    async def spawn_exec(
        self,
        name: str,
        argv: list[str],
        *,
        last: bool = False,
        stop_grace: float = STOP_GRACE,
        env: dict[str, str] | None = None,
    ) -> Child:
        self.state.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.state.logs / f"{name}.log"
        child = Child(
            name, argv, log_path, last=last, stop_grace=stop_grace, backoff=self.backoff()
        )
        child.env = env or {}
        await self._start(child)
        self.children.append(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{name}"))
        return child

    async def _start(self, child: Child) -> None:
        out = open(child.log_path, "ab")  # noqa: SIM115 - closed when the process exits
        try:
            proc = await asyncio.create_subprocess_exec(
                *child.argv,
                stdout=out,
                stderr=out,
                start_new_session=True,  # Ctrl-C reaches us once; we stop children in order
                env={**os.environ, **child.env} if child.env else None,
            )
        except BaseException:
            out.close()
            raise
        child.proc, child.log, child.started_at = proc, out, time.monotonic()
        self.state.write_pid(child.name, proc.pid)

    async def _watch(self, child: Child) -> None:
        """Restart ``child`` whenever it exits, until the tree stops."""
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if child.log is not None:
                child.log.close()
            if self._stopping:
                return
            child.exits += 1
            child.backoff.ran_for(time.monotonic() - child.started_at)
            first = child.backoff.new_episode
            delay = child.backoff.next_delay()
            line = (
                f"{child.name} exited with {code}; restarting in {delay:.1f}s "
                f"(restart {child.backoff.restarts})"
            )
            if first:
                line += f"; see {child.log_path}"
            elif child.backoff.capped:
                line += f"; it keeps crashing, see {child.log_path}"
            self.announce(line)
            await asyncio.sleep(delay)
            while True:
                try:
                    await self._start(child)
                    break
                except OSError as err:
                    delay = child.backoff.next_delay()
                    self.announce(f"{child.name} could not start ({err}); retrying in {delay:.1f}s")
                    await asyncio.sleep(delay)

    async def stop(self) -> None:
        """No more restarts; SIGTERM to every child at once (each stops cleanly on its
        own), then to the ``last`` ones; SIGKILL after each child's ``stop_grace``."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for wave in (
            [c for c in self.children if not c.last],
            [c for c in self.children if c.last],
        ):
            for child in wave:
                if child.proc is not None and child.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(self._reap(child) for child in wave))

    async def _reap(self, child: Child) -> None:
        if child.proc is None:
            return
        try:
            await asyncio.wait_for(child.proc.wait(), child.stop_grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
        if child.log is not None:
            child.log.close()
        self.state.remove_pid(child.name)


def _check_ports(options: UpOptions, demo_port: int) -> None:
    wanted = [
        ("--port", options.host, options.port),
        ("--nats-port", "127.0.0.1", options.nats_port),
    ]
    if options.demo:
        wanted.append(("--demo-port", DEMO_HOST, demo_port))
    for flag, host, port in wanted:
        probe = _client_host(host)
        if port_is_open(probe, port):
            raise SystemExit(f"{flag} {port}: already in use on {probe}; choose another port")


async def up(options: UpOptions) -> int:
    """Start everything, run the demo, serve until Ctrl-C/SIGTERM (children that exit
    are restarted, see ``ProcessTree``)."""
    state = StateDir(options.state_dir.resolve())
    demo_port = options.demo_port or options.port + 1
    try:
        with state.owned():
            _check_ports(options, demo_port)
            return await _serve(options, state, demo_port)
    except StateDirBusy as err:
        raise SystemExit(f"{err}: stop that `tb up` first, or choose another --state-dir") from None


async def _serve(options: UpOptions, state: StateDir, demo_port: int) -> int:
    started = time.monotonic()
    warning = open_bind_warning(options.host, options.port)
    if warning:
        announce(warning)
    system = System(options, state, demo_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    session = asyncio.create_task(system.session(started))
    stopping = asyncio.create_task(stop.wait())
    pending: set[asyncio.Task[Any]] = {session, stopping}
    code = 0
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                code = code if session.done() else 130
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
        return code
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        announce("Stopping…")
        await system.close()
        announce("Stopped.")


@dataclass
class System:
    """The embedded process tree and what `tb up` does with it."""

    options: UpOptions
    state: StateDir
    demo_port: int
    tree: ProcessTree = field(init=False)
    bus: Bus | None = None
    nats: EmbeddedAuthorization = field(init=False)
    admin_password: str = ""
    password_made: bool = False  # made by this start: shown once

    def __post_init__(self) -> None:
        self.tree = ProcessTree(self.state)
        self.nats = EmbeddedAuthorization(
            self.state.root / "nats", self.options.nats_port, self.state.store, self.options.runners
        )
        self.nats_url = f"nats://127.0.0.1:{self.options.nats_port}"
        self.api_url = f"http://{_client_host(self.options.host)}:{self.options.port}"
        self.demo_url = f"http://{DEMO_HOST}:{self.demo_port}"
        self.token_file = self.state.root / "demo" / "trafficbuster.txt"

    async def start_processes(self) -> None:
        o = self.options
        self.admin_password, self.password_made = admin_password(self.state)
        os.environ["TB_ADMIN_PASSWORD"] = self.admin_password  # for the API child
        self.nats.write_config()
        server = await self.tree.spawn_exec(
            "nats-server", nats_server_config_args(self.nats.config_path), last=True
        )
        try:
            await wait_for_port("127.0.0.1", o.nats_port)
        except TimeoutError:
            raise StartupFailed(
                f"nats-server did not listen on port {o.nats_port}; "
                f"see {self.state.logs / 'nats-server.log'}"
            ) from None
        self.state.nats_url_file.write_text(self.nats_url + "\n", encoding="utf-8")
        self.bus = await Bus.connect(
            self.nats.url("engine"), name="tb-up", config=bus_config_from_env()
        )
        await self.bus.provision()
        self.nats.follow_runner_keys(self.bus, lambda: _reload_nats(server))
        try:
            await self.bus.ensure_dispatch_consumer("linux", "chromium")
        except ConsumerSettingsRefused as err:
            raise StartupFailed(consumer_settings_message(err)) from None
        nats = ("--nats-url", self.nats_url)
        await self.tree.spawn("engine", "engine", *nats, env=self.nats.env("engine"))
        await self.tree.spawn(
            "api", "api", *nats, "--host", o.host, "--port", str(o.port),
            "--db", str(self.state.read_db), env=self.nats.env("api"),
        )  # fmt: skip
        if o.demo:
            self.token_file.parent.mkdir(parents=True, exist_ok=True)
            await self.tree.spawn(
                "demo-site", "demo-site", "--host", DEMO_HOST, "--port", str(self.demo_port),
                "--token-file", str(self.token_file),
            )  # fmt: skip
        # a stopping runner lets its started flows finish, then hands the rest back
        runner_grace = drain_grace_from_env() + RELEASE_GRACE + STOP_GRACE
        for n in range(o.runners):
            runner_id = local_runner_id(n + 1)
            await self.tree.spawn(
                f"runner-{n + 1}", "runner", *nats, "--api", self.api_url,
                "--slots", str(o.slots), "--executor", o.executor, "--runner-id", runner_id,
                stop_grace=runner_grace, env=self.nats.env(runner_id),
            )  # fmt: skip

    async def session(self, started: float) -> int:
        """Start, wait for readiness, print where everything is, run the demo (0 = all good)."""
        await self.start_processes()
        external = self.options.runners == 0
        await _until_ready(self.api_url, self.tree, timeout=90, without_runner=external)
        announce(f"TrafficBuster is up in {time.monotonic() - started:.1f}s")
        announce(f"  dashboard  {self.api_url}/")
        announce(f"  API docs   {self.api_url}/schema")
        auditor, ops = self.nats.url_files[AUDITOR], self.nats.url_files[OPS]
        announce(f"  NATS       {self.nats_url}  (authorization on; users in {auditor.parent})")
        announce(f'  auditor    {auditor}  (nats -s "$(cat {auditor})" stream view TB)')
        announce(f'  ops        {ops}  (nats -s "$(cat {ops})" stream ls)')
        announce(f"  logs       {self.state.logs}")
        note = login_note(self.state, self.password_made, self.admin_password)
        announce(f"  login      {note}")
        if external:
            announce(
                "waiting for a runner to register: make a key (POST "
                f"{self.api_url}/api/v1/runners/keys) and start one with "
                f"`TB_RUNNER_KEY=<key> tb runner --api {self.api_url}`"
            )
            await _until_ready(self.api_url, self.tree, timeout=None)
            announce("a runner registered: the system is ready")
        if not self.options.demo or self.bus is None:
            return 0
        try:
            key = await demo_api_key(self.api_url, self.admin_password)
            if key is None:
                return 1
            ok = await run_demo(
                self.api_url, self.demo_url, self.token_file, self.bus, self.options, key
            )
        except OSError as err:  # the API went away mid-demo (it is being restarted)
            announce(f"demo: the API did not answer: {err}")
            return 1
        return 0 if ok else 1

    async def close(self) -> None:
        await self.nats.stop_following()
        if self.bus is not None:
            await self.bus.close()
        await self.tree.stop()
        with contextlib.suppress(FileNotFoundError):
            self.state.nats_url_file.unlink()


def _reload_nats(server: Child) -> None:
    """nats-server reads its configuration again on SIGHUP (users, permissions)."""
    if server.proc is not None and server.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGHUP)


ADMIN_PASSWORD_FILE = "admin-password"


def admin_password(state: StateDir) -> tuple[str, bool]:
    """The first admin's password: TB_ADMIN_PASSWORD, else the one an earlier `tb up`
    made for this state directory, else a new one written there (mode 0600). The second
    value says whether it was made just now (and so is shown once)."""
    given = os.environ.get("TB_ADMIN_PASSWORD", "")
    if given:
        return refuse_placeholder("TB_ADMIN_PASSWORD", given, min_length=PASSWORD_MIN_LENGTH), False
    path = state.root / ADMIN_PASSWORD_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), False
    password = secrets.token_urlsafe(18)
    state.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(password + "\n")
    return password, True


def login_note(state: StateDir, made: bool, password: str) -> str:
    where = state.root / ADMIN_PASSWORD_FILE
    if made:
        return f"admin / {password}  (shown once; kept in {where}, mode 0600)"
    if os.environ.get("TB_ADMIN_PASSWORD") and not where.exists():
        return "admin / the password in TB_ADMIN_PASSWORD"
    return f"admin / the password in {where} (or TB_ADMIN_PASSWORD)"


def _client_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


STARTUP_EXITS = 3  # a child that exits this often before the system is ready is broken


async def _until_ready(
    api_url: str, tree: ProcessTree, timeout: float | None, *, without_runner: bool = False
) -> None:
    """Until /readyz answers 200 (or only a runner is missing, with ``without_runner``);
    ``StartupFailed`` after ``timeout`` or when a child keeps exiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last: Any = None
    while deadline is None or time.monotonic() < deadline:
        for child in tree.children:
            if child.exits >= STARTUP_EXITS:
                raise StartupFailed(
                    f"{child.name} exited {child.exits} times during start-up "
                    f"(last with {child.returncode}); see {child.log_path}"
                )
        with contextlib.suppress(OSError):
            status, body = await call("GET", f"{api_url}/readyz", timeout=2)
            if status == 200:
                return
            if without_runner and isinstance(body, dict) and body.get("missing") == ["runner"]:
                return
            last = body
        await asyncio.sleep(0.25)
    raise StartupFailed(f"not ready after {timeout:.0f}s: {last}")


async def demo_api_key(api_url: str, password: str) -> dict[str, str] | None:
    """Log in as admin, make an API key for the demo, log out: the demo runs on the key,
    so a login on the dashboard (which ends older sessions) never stops it."""
    status, session = await call(
        "POST", f"{api_url}/api/v1/auth/login", {"username": "admin", "password": password}
    )
    if status != 200:
        announce(f"demo: admin login failed: {session}")
        return None
    bearer = {"Authorization": f"Bearer {session['token']}"}
    status, made = await call(
        "POST", f"{api_url}/api/v1/api-keys", {"name": "tb up demo"}, headers=bearer
    )
    await call("POST", f"{api_url}/api/v1/auth/logout", headers=bearer)
    if status != 201:
        announce(f"demo: API key refused: {made}")
        return None
    return {"X-API-Key": made["key"]}


async def _demo_consent(api_url: str, demo_url: str, token_file: Path, key: dict[str, str]) -> bool:
    """Claim the demo host and verify it through the well-known path the demo site
    serves from ``token_file``; a host an earlier run verified is verified again."""
    consents = f"{api_url}/api/v1/consents"
    verify = f"{consents}/{DEMO_HOST}/verify"
    status, claimed = await call("POST", consents, {"domain": DEMO_HOST}, headers=key)
    if status == 409 and "verified" in json.dumps(claimed):
        # verified by an earlier run on this state dir: renew it with the token it stored
        if token_file.exists():
            status, verified = await call("POST", verify, {"base_url": demo_url}, headers=key)
            if status == 200:
                announce(f"demo: consent for {DEMO_HOST} renewed via {verified['evidence']}")
                return True
        # that token is gone (or is not the current one): start the claim over
        await call(
            "POST", f"{consents}/{DEMO_HOST}/revoke", {"reason": "demo token lost"}, headers=key
        )
        status, claimed = await call("POST", consents, {"domain": DEMO_HOST}, headers=key)
    if status != 201:
        announce(f"demo: claim failed: {claimed}")
        return False
    token_file.write_text(claimed["token"] + "\n", encoding="utf-8")
    status, verified = await call("POST", verify, {"base_url": demo_url}, headers=key)
    if status != 200:
        announce(f"demo: verification failed: {verified}")
        return False
    announce(f"demo: consent for {DEMO_HOST} verified via {verified['evidence']}")
    return True


async def run_demo(
    api_url: str,
    demo_url: str,
    token_file: Path,
    bus: Bus,
    options: UpOptions,
    key: dict[str, str],
) -> bool:
    """Prove consent through the real path, run a job of 20+ flows, show progress."""
    if not await _demo_consent(api_url, demo_url, token_file, key):
        return False
    job = {
        "name": "demo: browse the bundled shop",
        "targets": [
            {"url": f"{demo_url}/", "flows": 8, "clicks": 2},
            {"url": f"{demo_url}/products", "flows": 6, "clicks": 2},
            {"url": f"{demo_url}/about", "flows": 6, "clicks": 1},
        ],
        "settings": {
            # with --runners 0 the runner that registered has at least --slots slots
            "instance_count": max(options.runners, 1) * options.slots,
            "session_seconds": 1.0,
        },
    }
    status, created = await call("POST", f"{api_url}/api/v1/jobs", job, headers=key)
    if status != 201:
        announce(f"demo: job refused by the API: {created}")
        return False
    job_id = created["job_id"]
    announce(f"demo: job {job_id} created")
    bar = ProgressBar("demo", 20)
    view: Any = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # the API may be restarting: ask again
            status, view = await call(
                "GET", f"{api_url}/api/v1/jobs/{job_id}?min_seq={created['seq']}", headers=key
            )
            if status == 200:
                finished = view["flows_done"] + view["flows_failed"]
                bar.update(finished, view["flows_total"] or 20, view["status"])
                if view["status"] in TERMINAL_JOB_STATUSES:
                    break
        await asyncio.sleep(0.5)
    bar.finish()
    if not view or view.get("status") != JobStatus.COMPLETED:
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
