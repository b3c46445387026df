"""The ``tb`` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from cli.http import call
from cli.nats_server import port_is_open
from tests.api_client import bearer
from tests.conftest import NatsServer, free_port

TB = [sys.executable, "-m", "cli.main"]


class Console:
    """Everything a process printed so far, read as it comes (progress bars included)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.text, self.closed = proc, "", False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(4096):
            async with self._changed:
                self.text += chunk.decode(errors="replace")
                self._changed.notify_all()
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        async with asyncio.timeout(timeout), self._changed:
            while not (match := re.search(pattern, self.text)):
                assert not self.closed, f"exited before {pattern!r}:\n{self.text}"
                await self._changed.wait()
        return match

    async def finish(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            await self._reader
            return await self.proc.wait()


async def start_up(state: Path, *args: str, env: dict[str, str] | None = None) -> Console:
    """`tb up` on free loopback ports; ``args`` add flags."""
    proc = await asyncio.create_subprocess_exec(
        *TB, "up", "--port", str(free_port()), "--demo-port", str(free_port()),
        "--state-dir", str(state), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return Console(proc)


@contextlib.asynccontextmanager
async def stopped_on_exit(console: Console) -> AsyncIterator[Console]:
    """SIGTERM to `tb up` when the test leaves, whatever happened."""
    try:
        yield console
    finally:
        if console.proc.returncode is None:
            console.proc.send_signal(signal.SIGTERM)
            try:
                await console.finish(60)
            except TimeoutError:
                console.proc.kill()
                await console.proc.wait()


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


@pytest.mark.slow
async def test_up_runs_the_demo_job_counting_every_flow_once(tmp_path: Path) -> None:
    # no browser here, to keep the default suite short: the demo in real Chromium runs
    # in the slow restart test below, and flows in Chromium in test_end_to_end
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
        "--executor",
        "noop",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "20/20 flows done, 0 failed" in text
    assert "every flow counted exactly once" in text
    password = (tmp_path / "tb" / "admin-password").read_text().strip()
    assert text.count(password) == 1  # shown once, beside the dashboard's address
    assert not port_is_open("127.0.0.1", port) and not port_is_open("127.0.0.1", nats_port)


@pytest.mark.slow
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
    pids = {p.stem: int(p.read_text()) for p in (tmp_path / "tb" / "pids").glob("*.pid")}
    assert sorted(pids) == ["api", "engine", "nats-server", "runner-1"]
    assert b"nats-server" in Path(f"/proc/{pids['nats-server']}/cmdline").read_bytes()
    proc.send_signal(signal.SIGTERM)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, "".join(lines) + rest.decode()
    assert "Stopped." in rest.decode()
    assert not port_is_open("127.0.0.1", port) and not port_is_open("127.0.0.1", nats_port)
    leftovers = subprocess.run(
        ["pgrep", "-f", "--", rf"(--nats-port |:){nats_port}\b"], capture_output=True, text=True
    ).stdout.split()
    assert leftovers == []
    assert not list((tmp_path / "tb" / "pids").glob("*.pid"))


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


@pytest.mark.slow
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


# -- supervision ----------------------------------------------------------------------


def test_backoff_grows_to_its_cap_with_jitter_and_resets_after_a_stable_run() -> None:
    from cli.supervise import Backoff

    backoff = Backoff(base=0.5, cap=4.0, stable_after=60.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len(set(delays)) == len(delays)  # jittered: never in lockstep
    assert backoff.capped and backoff.restarts == 8
    backoff.ran_for(59.0)  # still crashing within the episode
    assert 2.0 <= backoff.next_delay() <= 4.0
    backoff.ran_for(60.0)  # ran stably: the next crash starts a new episode
    assert backoff.new_episode
    assert 0.25 <= backoff.next_delay() <= 0.5
    for _ in range(5000):  # days of crash-looping never overflow the arithmetic
        assert backoff.next_delay() <= 4.0


async def test_supervise_restarts_a_fresh_instance_and_logs_one_traceback_per_episode() -> None:
    from cli.supervise import Backoff, supervise

    instances: list[int] = []

    async def component() -> None:
        instances.append(len(instances))
        if len(instances) <= 3:
            raise ConnectionError(f"instance {instances[-1]} lost its server")

    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(10):
            await supervise("demo", component, backoff=Backoff(base=0.01, cap=0.02))
    assert instances == [0, 1, 2, 3]  # three crashes, then a fresh one ran to its end
    crashes = [e for e in logs if e["event"].startswith("component.crashed")]
    assert [e["event"] for e in crashes] == ["component.crashed"] + ["component.crashed_again"] * 2
    assert crashes[0].get("exc_info") and not any(e.get("exc_info") for e in crashes[1:])
    assert [e["restart"] for e in crashes] == [1, 2, 3]


async def test_supervise_passes_cancellation_through_and_stops_waiting_when_asked() -> None:
    from cli.supervise import Backoff, supervise

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("forever", forever))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    swallowed = asyncio.Event()
    runs: list[int] = []

    async def swallows_its_cancel() -> None:
        runs.append(1)
        try:
            swallowed.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("closed") from None  # what a library may turn it into

    task = asyncio.create_task(supervise("swallower", swallows_its_cancel))
    await asyncio.wait_for(swallowed.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert runs == [1]  # stopped, not restarted

    stopping = asyncio.Event()

    async def crash() -> None:
        stopping.set()  # asked to stop while it crashes: no restart after the wait
        raise RuntimeError("boom")

    with structlog.testing.capture_logs():
        await asyncio.wait_for(
            supervise("crash", crash, backoff=Backoff(base=60, cap=60), stopping=stopping), 5
        )


async def test_process_tree_restarts_a_crash_looping_child_without_touching_the_others(
    tmp_path: Path,
) -> None:
    from cli.state_dir import StateDir
    from cli.supervise import Backoff
    from cli.up import ProcessTree

    lines: list[str] = []
    said = asyncio.Condition()

    def announce(line: str) -> None:
        lines.append(line)
        asyncio.get_running_loop().create_task(_notify(said))

    state = StateDir(tmp_path)
    tree = ProcessTree(state, announce=announce, backoff=lambda: Backoff(base=0.02, cap=0.08))
    steady = await tree.spawn_exec("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    await tree.spawn_exec("crashy", [sys.executable, "-c", "raise SystemExit(3)"])
    try:
        async with asyncio.timeout(30), said:
            await said.wait_for(lambda: sum("crashy exited with 3" in x for x in lines) >= 5)
        assert lines[0].startswith("crashy exited with 3; restarting in ")
        assert "(restart 1); see " in lines[0] and "crashy.log" in lines[0]
        assert any("it keeps crashing" in line for line in lines[3:])
        assert not any("steady" in line for line in lines)
        assert steady.returncode is None
        pid = int((tmp_path / "pids" / "steady.pid").read_text())
        assert steady.proc is not None and pid == steady.proc.pid
    finally:
        await tree.stop()
    assert steady.returncode is not None
    assert not list((tmp_path / "pids").glob("*.pid"))


async def test_each_child_gets_its_own_grace_after_sigterm(tmp_path: Path) -> None:
    # a child that takes its time over SIGTERM (as a draining runner does) is waited for
    # within its grace, and killed only after it
    from cli.state_dir import StateDir
    from cli.up import ProcessTree

    ready = "print('ready', flush=True); time.sleep(60)"
    stubborn = f"import signal, time; signal.signal(signal.SIGTERM, lambda *_: None); {ready}"
    slow = (
        "import signal, sys, time; "
        f"signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0))); {ready}"
    )
    tree = ProcessTree(StateDir(tmp_path), announce=lambda line: None)
    killed = await tree.spawn_exec("killed", [sys.executable, "-c", stubborn], stop_grace=0.5)
    drained = await tree.spawn_exec("drained", [sys.executable, "-c", slow], stop_grace=20)

    def both_ready() -> bool:
        logs = [tmp_path / "logs" / f"{name}.log" for name in ("killed", "drained")]
        return all("ready" in log.read_text() for log in logs)

    async with asyncio.timeout(20):
        while not both_ready():  # noqa: ASYNC110 - a file to watch, no event to wait on
            await asyncio.sleep(0.05)
    await tree.stop()
    assert killed.returncode == -signal.SIGKILL
    assert drained.returncode == 0  # its 1.5 s of stopping ran to the end: not cut at 0.5 s


async def _notify(condition: asyncio.Condition) -> None:
    async with condition:
        condition.notify_all()


async def test_engine_remakes_a_lost_consumer_without_a_crash_or_exiting(
    nats_server: NatsServer,
) -> None:
    """A lost consumer is NATS trouble the watch waits out itself (supervision is the net
    under it, for what is not transient: see the supervise tests above)."""
    from engine.advisories import CONSUMER
    from engine.bus import Bus
    from schemas import subjects

    async with await Bus.connect(nats_server.url, name="test") as bus:
        created: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_created(msg: object) -> None:
            created.put_nowait(b"")

        await bus.nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.CREATED.{subjects.ADVISORIES_STREAM}.{CONSUMER}",
            cb=on_created,
        )
        engine = await asyncio.create_subprocess_exec(
            *TB, "engine", "--nats-url", nats_server.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        console = Console(engine)
        try:
            await asyncio.wait_for(created.get(), 30)
            # the exhausted-delivery watch loses its consumer: its next pull fails
            await bus.js.delete_consumer(subjects.ADVISORIES_STREAM, CONSUMER)
            await asyncio.wait_for(created.get(), 30)  # the watch made it again
            assert engine.returncode is None, console.text
            assert "component.crashed" not in console.text
        finally:
            engine.send_signal(signal.SIGTERM)
            assert await console.finish(30) == 0, console.text


@pytest.mark.slow
async def test_up_restarts_a_killed_engine_and_the_demo_job_counts_every_flow_once(
    tmp_path: Path,
) -> None:
    from cli.nats_auth import with_local_credentials
    from engine.bus import Bus
    from schemas import subjects
    from schemas.events import FlowDone, JobCompleted

    state, nats_port = tmp_path / "tb", free_port()
    async with stopped_on_exit(await start_up(state, "--nats-port", str(nats_port))) as up:
        job_id = (await up.wait_for(r"demo: job (\S+) created", 180)).group(1)
        url = with_local_credentials(state / "nats", f"nats://127.0.0.1:{nats_port}")
        async with await Bus.connect(url, name="test") as bus:
            async with asyncio.timeout(120):  # mid-job: a flow is done, the job is not
                async for _ in bus.read(1, subjects.flow_subject(job_id, "FlowDone")):
                    break
            assert not await bus.load(subjects.job_subject(job_id, "JobCompleted"))
            engine = int((state / "pids" / "engine.pid").read_text())
            assert b"engine" in Path(f"/proc/{engine}/cmdline").read_bytes()
            os.kill(engine, signal.SIGKILL)
            await up.wait_for(r"engine exited with -9; restarting in [\d.]+s \(restart 1\)", 30)
            await up.wait_for(r"every flow counted exactly once", 240)
            assert "20/20 flows done, 0 failed" in up.text
            restarted = int((state / "pids" / "engine.pid").read_text())
            assert restarted != engine
            assert b"engine" in Path(f"/proc/{restarted}/cmdline").read_bytes()
            completed = [
                env.event
                for env in await bus.load(subjects.job_subject(job_id, "JobCompleted"))
                if isinstance(env.event, JobCompleted)
            ]
            assert [(c.flows_done, c.flows_failed) for c in completed] == [(20, 0)]
            done = [
                env.event.flow_id
                for env in await bus.load(subjects.flow_subject(job_id, "FlowDone"))
                if isinstance(env.event, FlowDone)
            ]
            assert len(set(done)) == 20
        up.proc.send_signal(signal.SIGTERM)
        assert await up.finish(60) == 0, up.text
    assert "Stopped." in up.text


async def test_up_refuses_a_state_dir_another_process_serves(tmp_path: Path) -> None:
    from cli.state_dir import StateDir

    with StateDir(tmp_path / "tb").owned():
        result = await asyncio.to_thread(
            subprocess.run,
            [*TB, "up", "--port", str(free_port()), "--nats-port", str(free_port()),
             "--state-dir", str(tmp_path / "tb")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"is in use by pid {os.getpid()}" in result.stderr


# -- offline replay and verify --------------------------------------------------------


async def _real_run(nats_server: NatsServer, tmp_path: Path) -> tuple[str, Path]:
    """A job run by the real engine, projector and a runner; returns (job id, read model)."""
    from agents.executor import NoopExecutor
    from agents.runner import Runner
    from engine.bus import Bus
    from schemas.values import Target
    from tests.harness import embedded

    async with await Bus.connect(nats_server.url, name="test") as bus:
        await bus.provision()
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1")
            runner = Runner(bus, NoopExecutor(), slots=8)
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [Target(url="http://127.0.0.1:9/", flows=30, clicks=2)],
                instance_count=8,
                session_seconds=0,
            )
            await tb.wait_terminal(job_id)
            runner.stop()
            await asyncio.wait_for(asyncio.gather(*tb.tasks[1:], return_exceptions=True), 30)
            await tb.projector.wait_for(await bus.last_seq(), timeout=10)
    return job_id, tb.db_path


async def tb_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*TB, *args], capture_output=True, text=True, timeout=timeout
    )


def _nats_servers_on(store: Path) -> list[str]:
    return subprocess.run(
        ["pgrep", "-f", f"nats-server.*{store}"], capture_output=True, text=True
    ).stdout.split()


@pytest.mark.slow
async def test_replay_with_the_system_stopped_serves_the_store_itself(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    from projections.replay import dump_tables

    job_id, db = await _real_run(nats_server, tmp_path)
    await nats_server.kill()  # the system is stopped; tmp_path is its state dir
    before = await dump_tables(db)
    assert [row[0] for row in before["jobs"]] == [job_id] and len(before["flows"]) == 30
    closed = str(free_port())
    verified = await tb_cli(
        "replay", "--state-dir", str(tmp_path), "--nats-port", closed, "--verify"
    )
    assert verified.returncode == 0, verified.stderr
    assert "matches the event log" in verified.stdout
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    rebuilt = await tb_cli("replay", "--state-dir", str(tmp_path), "--nats-port", closed)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "The system is stopped" in rebuilt.stderr and "rebuilt" in rebuilt.stdout
    assert await dump_tables(db) == before
    assert _nats_servers_on(nats_server.store) == []  # stopped what it started


@pytest.mark.slow
async def test_replay_names_the_url_it_cannot_reach_within_10s(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = await tb_cli("replay", "--state-dir", str(tmp_path), "--nats-url", url)
    assert time.monotonic() - started < 10
    assert result.returncode in (1, 2)
    assert f"cannot reach NATS at {url}" in result.stderr


async def test_replay_without_a_store_or_a_server_says_so(tmp_path: Path) -> None:
    port = free_port()
    result = await tb_cli("replay", "--state-dir", str(tmp_path), "--nats-port", str(port))
    assert result.returncode == 1
    assert f"nothing listens on nats://127.0.0.1:{port}" in result.stderr
    assert "holds no event store" in result.stderr


@pytest.mark.slow
async def test_verify_against_a_running_system_under_load_matches_and_catches_tampering(
    bus: object, nats_server: NatsServer, tmp_path: Path
) -> None:
    from agents.executor import NoopExecutor
    from agents.runner import Runner
    from engine.bus import Bus
    from schemas.values import Target
    from tests.harness import embedded

    assert isinstance(bus, Bus)
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise("127.0.0.1")
        tb.run(Runner(bus, NoopExecutor(), slots=4).run(), "runner")
        first = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=5)], instance_count=4, session_seconds=0
        )
        await tb.wait_terminal(first)
        # the system keeps writing while verify runs: a long job, flows one by one
        busy = await tb.create_job(
            [Target(url="http://127.0.0.1:9/", flows=3000)], instance_count=1, session_seconds=0
        )
        await tb.wait_job(busy, lambda v: v.flows_done > 0)
        args = ("replay", "--nats-url", nats_server.url, "--db", str(tb.db_path), "--verify")
        verified = await tb_cli(*args)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "matches the event log at sequence" in verified.stdout
        view = await tb.job(busy)
        assert view is not None and view.status == "running"  # it was under load throughout
        await asyncio.to_thread(_tamper, tb.db_path, first)  # the projector keeps writing
        tampered = await tb_cli(*args)
        assert tampered.returncode == 1, tampered.stdout + tampered.stderr
        assert "DIFFERS" in tampered.stdout
        assert f"jobs (job_id): {first}" in tampered.stdout


def _tamper(db_path: Path, job_id: str) -> None:
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as db, db:
        db.execute("UPDATE jobs SET flows_done = flows_done + 1 WHERE job_id = ?", (job_id,))


# -- settings that say what they do ---------------------------------------------------


async def test_changed_ack_wait_and_max_deliver_reach_the_existing_dispatch_consumer(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.settings import bus_config_from_env
    from engine.bus import Bus
    from schemas import subjects

    async with await Bus.connect(nats_server.url, name="first") as bus:
        await bus.provision()
        durable = await bus.ensure_dispatch_consumer("linux", "chromium")  # the defaults
    monkeypatch.setenv("TB_ACK_WAIT", "7")
    monkeypatch.setenv("TB_MAX_DELIVER", "9")
    config = bus_config_from_env()
    async with await Bus.connect(nats_server.url, name="second", config=config) as bus:
        assert await bus.ensure_dispatch_consumer("linux", "chromium") == durable
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, durable)
    assert (info.config.ack_wait, info.config.max_deliver) == (7.0, 9)


async def test_a_consumer_that_refuses_the_new_ack_wait_stops_the_start_naming_the_setting(
    bus: object,
) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from cli.commands import consumer_settings_message
    from engine.bus import Bus, BusConfig, ConsumerSettingsRefused
    from schemas import subjects

    assert isinstance(bus, Bus)
    durable = subjects.dispatch_consumer("linux", "chromium")
    # made by hand (or by another version) with a deliver policy the server cannot change
    await bus.js.add_consumer(
        subjects.EVENTS_STREAM,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=subjects.dispatch_subject("linux", "chromium"),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=60.0,
            max_deliver=5,
        ),
    )
    bus.config = BusConfig(ack_wait=7.0, max_deliver=5)
    with pytest.raises(ConsumerSettingsRefused) as refused:
        await bus.ensure_dispatch_consumer("linux", "chromium")
    assert refused.value.settings == {"ack_wait": (60.0, 7.0)}
    message = consumer_settings_message(refused.value)
    assert message.startswith("TB_ACK_WAIT=7.0 (it keeps 60.0)") and durable in message
    bus.config = BusConfig(ack_wait=60.0, max_deliver=5)  # what it has: nothing to refuse
    assert await bus.ensure_dispatch_consumer("linux", "chromium") == durable


@pytest.mark.parametrize(
    ("command", "name", "value"),
    [("up", "AUTH_ENABLED", "false"), ("api", "TB_AUTH_ENABLED", "0")],
)
def test_turning_login_off_is_refused_at_start(command: str, name: str, value: str) -> None:
    extra = ["--nats-url", "nats://127.0.0.1:1"] if command == "api" else []
    env = {k: v for k, v in os.environ.items() if k not in ("AUTH_ENABLED", "TB_AUTH_ENABLED")}
    result = subprocess.run(
        [*TB, command, *extra],
        capture_output=True, text=True, timeout=60, env={**env, name: value},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "AUTH_ENABLED=false: refused: login cannot be turned off" in result.stderr
    assert "listens on loopback only" not in result.stdout + result.stderr


def test_auth_enabled_true_is_accepted_and_hosts_beyond_loopback_are_warned_of(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.settings import auth_refusal, open_bind_warning

    monkeypatch.delenv("TB_AUTH_ENABLED", raising=False)
    monkeypatch.delenv("AUTH_ENABLED", raising=False)
    assert auth_refusal() is None
    monkeypatch.setenv("AUTH_ENABLED", "true")
    assert auth_refusal() is None
    monkeypatch.setenv("AUTH_ENABLED", "maybe")
    with pytest.raises(SystemExit, match="AUTH_ENABLED: must be true or false"):
        auth_refusal()
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert open_bind_warning(host, 8000) is None
    for host in ("0.0.0.0", "", "::", "192.0.2.10", "10.0.0.1", "example.com", "localhost.evil"):
        warning = open_bind_warning(host, 8000)
        assert warning and f"--host {host!r}" in warning and "plain HTTP" in warning


def test_up_makes_the_admin_password_once_and_keeps_it_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.state_dir import StateDir
    from cli.up import ADMIN_PASSWORD_FILE, admin_password, login_note

    monkeypatch.delenv("TB_ADMIN_PASSWORD", raising=False)
    state = StateDir(tmp_path / "tb")
    made, fresh = admin_password(state)
    assert fresh and len(made) >= 20
    path = state.root / ADMIN_PASSWORD_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().strip() == made
    assert made in login_note(state, True, made)
    assert admin_password(state) == (made, False)  # a later start reads it back
    assert made not in login_note(state, False, made) and str(path) in login_note(
        state, False, made
    )
    monkeypatch.setenv("TB_ADMIN_PASSWORD", "given-by-the-operator")
    assert admin_password(state) == ("given-by-the-operator", False)


def test_session_durations_read_8h_30m_and_seconds_with_their_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.settings import identity_config_from_env

    for name in ("TB_SESSION_MAX_AGE", "TB_SESSION_IDLE", "TB_SESSION_GRACE", "GRACE_PERIOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JWT_EXP", "8h")
    monkeypatch.setenv("TB_SESSION_IDLE", "30m")
    monkeypatch.setenv("GRACE_PERIOD", "45")
    policy = identity_config_from_env().sessions
    assert (policy.max_age, policy.idle, policy.grace) == (8 * 3600, 30 * 60, 45)
    monkeypatch.setenv("TB_SESSION_MAX_AGE", "2h")  # the TB_ name wins over its alias
    assert identity_config_from_env().sessions.max_age == 7200
    monkeypatch.setenv("TB_SESSION_IDLE", "soon")
    with pytest.raises(SystemExit, match="TB_SESSION_IDLE"):
        identity_config_from_env()


async def test_api_alone_with_no_user_and_no_admin_password_refuses_to_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TB_ADMIN_PASSWORD"}
    proc = await asyncio.create_subprocess_exec(
        *TB, "api", "--nats-url", nats_server.url, "--port", str(free_port()),
        "--db", str(tmp_path / "read.db"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert "TB_ADMIN_PASSWORD is not set" in err.decode()


async def test_up_beyond_loopback_gets_past_the_host_check(tmp_path: Path) -> None:
    with socket.socket() as taken:  # the port check comes next: nothing is bound
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [*TB, "up", "--host", "0.0.0.0", "--port", str(port),
             "--nats-port", str(free_port()), "--state-dir", str(tmp_path / "tb")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"--port {port}: already in use" in result.stderr


@pytest.mark.slow
async def test_up_with_no_runners_waits_for_one_started_elsewhere_with_a_runner_key(
    tmp_path: Path,
) -> None:
    """NATS runs with authorization: a runner started elsewhere trades a key for its
    credentials and runs the demo's flows; a wrong key stops with Authentication Failed."""
    up = await start_up(tmp_path / "tb", "--runners", "0", "--exit-when-done")
    async with stopped_on_exit(up):
        match = await up.wait_for(
            r"start one with `TB_RUNNER_KEY=<key> tb runner --api (\S+)`", 120
        )
        api = match.group(1)
        wrong = await asyncio.create_subprocess_exec(
            *TB, "runner", "--api", api, "--executor", "noop",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "RUNNER_API_KEY": "rk_nobody.not-a-key"},
        )  # fmt: skip
        out, _ = await asyncio.wait_for(wrong.communicate(), 60)
        assert wrong.returncode != 0
        assert "Authentication Failed" in out.decode()
        password = (tmp_path / "tb" / "admin-password").read_text().strip()
        admin = await bearer(api, password)
        status, made = await call(
            "POST", f"{api}/api/v1/runners/keys", {"name": "elsewhere"}, headers=admin
        )
        assert status == 201, made
        runner = await asyncio.create_subprocess_exec(
            *TB, "runner", "--api", api, "--executor", "noop",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "TB_RUNNER_KEY": made["key"]},
        )  # fmt: skip
        try:
            assert await up.finish(120) == 0, up.text
        finally:
            runner.send_signal(signal.SIGTERM)
            await asyncio.wait_for(runner.wait(), 30)
    assert "every flow counted exactly once" in up.text


# -- the demo on a state dir used before ----------------------------------------------


@pytest.mark.slow
async def test_a_second_up_on_the_same_state_dir_runs_the_demo_again(tmp_path: Path) -> None:
    for run in (1, 2, 3):
        if run == 3:  # a state dir whose demo token was lost claims the demo host anew
            (tmp_path / "tb" / "demo" / "trafficbuster.txt").unlink()
        up = await start_up(
            tmp_path / "tb", "--nats-port", str(free_port()), "--exit-when-done",
            "--executor", "noop",
        )  # fmt: skip
        async with stopped_on_exit(up):
            assert await up.finish(180) == 0, f"run {run}:\n{up.text}"
        assert "every flow counted exactly once" in up.text, f"run {run}:\n{up.text}"


# -- quarantine -----------------------------------------------------------------------


async def test_quarantine_lists_a_garbage_flow_message_once_a_reader_has_met_it(
    bus: object, nats_server: NatsServer, tmp_path: Path
) -> None:
    from engine.bus import Bus
    from schemas import subjects

    assert isinstance(bus, Bus)
    subject = subjects.flow_subject("job_garbage", "FlowDone")
    garbage = b"\x00\xff{not json at all" + b"x" * 100
    ack = await bus.js.publish(subject, garbage)
    online = ("--nats-url", nats_server.url)
    before = await tb_cli("quarantine", *online)
    assert before.returncode == 0, before.stderr
    assert "no quarantined messages" in before.stdout  # nobody has read it yet
    replay = await tb_cli("replay", *online, "--db", str(tmp_path / "read.db"))
    assert replay.returncode == 0, replay.stderr
    for args in (online, ("--state-dir", str(tmp_path), "--nats-port", str(free_port()))):
        listed = await tb_cli("quarantine", *args)
        assert listed.returncode == 0, listed.stderr
        assert f"TB {ack.seq}  {subject}" in listed.stdout
        assert "reason: " in listed.stdout
        assert f"raw:    {len(garbage)} bytes: \\x00\\xff{{not json at all" in listed.stdout
        await nats_server.kill()  # the second round reads the stopped system's store
    assert "The system is stopped" in listed.stderr
