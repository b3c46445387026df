"""``tb up`` runs NATS with authorization: its users, the auditor's and ops' URL files,
credentials kept off command lines, and a revoked runner key disconnected at once."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import DeliverPolicy

from cli.http import call
from schemas import subjects
from tests.api_client import bearer
from tests.test_cli import TB, Console, start_up, stopped_on_exit


@pytest.mark.slow  # a whole `tb up` (no demo, no local runner): about 15 s
async def test_up_gives_auditor_ops_and_runners_their_own_nats_users(tmp_path: Path) -> None:
    state = tmp_path / "tb"
    up = await start_up(state, "--runners", "0", "--no-demo")
    async with stopped_on_exit(up):
        waiting = r"start one with `TB_RUNNER_KEY=<key> tb runner --api (\S+)`"
        api = (await up.wait_for(waiting, 120)).group(1)
        nats_dir = state / "nats"
        for name in ("auditor.url", "ops.url", "credentials.json", "nats-server.conf"):
            assert (nats_dir / name).stat().st_mode & 0o777 == 0o600, name
            if name.endswith(".url"):
                assert str(nats_dir / name) in up.text  # printed where it is
        passwords = [line.rsplit("@", 1)[0].rsplit(":", 1)[1] for line in _urls(nats_dir)]
        for pid_file in (state / "pids").glob("*.pid"):  # `ps` shows no password
            cmdline = Path(f"/proc/{pid_file.read_text().strip()}/cmdline").read_bytes()
            assert not any(p.encode() in cmdline for p in passwords), pid_file.name

        admin = await bearer(api, (state / "admin-password").read_text().strip())
        latency = await _revoked_key_is_disconnected(api, admin)
        print(f"revocation through tb up: DELETE sent to disconnect in {latency * 1000:.0f} ms")
        assert latency < 1.0
        await _revoked_runner_stops(api, admin)
        auditor_url, ops_url = _urls(nats_dir)
        await _auditor_reads_but_changes_nothing(auditor_url)
        await _ops_administers_streams_and_consumers(ops_url)


async def _revoked_runner_stops(api: str, admin: dict[str, str]) -> None:
    """A running `tb runner` whose key is revoked says Authentication Failed and exits."""
    status, made = await call(
        "POST", f"{api}/api/v1/runners/keys", {"name": "revoked"}, headers=admin
    )
    assert status == 201, made
    runner = await asyncio.create_subprocess_exec(
        *TB, "runner", "--api", api, "--executor", "noop",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TB_RUNNER_KEY": made["key"]},
    )  # fmt: skip
    console = Console(runner)
    try:
        await console.wait_for("Registered", 60)
        status, _ = await call(
            "DELETE", f"{api}/api/v1/runners/keys/{made['key_id']}", headers=admin
        )
        assert status == 200
        assert await console.finish(30) == 2, console.text
    finally:
        if runner.returncode is None:
            runner.kill()
            await runner.wait()
    assert "Authentication Failed" in console.text


def _urls(nats_dir: Path) -> list[str]:
    return [(nats_dir / f"{who}.url").read_text().strip() for who in ("auditor", "ops")]


async def _auditor_reads_but_changes_nothing(url: str) -> None:
    refused: list[str] = []

    async def on_error(err: Exception) -> None:
        refused.append(str(err).lower())

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=1)
        info = await js.stream_info(subjects.EVENTS_STREAM)
        sub = await js.subscribe(
            "tb.>", stream=subjects.EVENTS_STREAM, ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )  # fmt: skip
        first = await sub.next_msg(timeout=2)
        assert first.subject.startswith("tb.")  # the log's first event (the first admin's)
        await sub.unsubscribe()
        await nc.publish("tb.job.x.JobCancelled", b"{}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.purge_stream(subjects.EVENTS_STREAM)
        await nc.flush()
        await asyncio.sleep(0.2)
        assert any("permissions violation" in e and "tb.job.x" in e for e in refused), refused
        after = await js.stream_info(subjects.EVENTS_STREAM)
        assert after.state.last_seq == info.state.last_seq
    finally:
        await nc.close()


async def _ops_administers_streams_and_consumers(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=2)
        assert subjects.EVENTS_STREAM in {s.config.name for s in await js.streams_info()}
        consumers = {c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)}
        assert "dispatch_linux_chromium" in consumers
    finally:
        await nc.close()


async def _revoked_key_is_disconnected(api: str, admin: dict[str, str]) -> float:
    status, made = await call(
        "POST", f"{api}/api/v1/runners/keys", {"name": "timed"}, headers=admin
    )
    assert status == 201, made
    got = await asyncio.to_thread(_exchange, api, made["key"])
    gone = asyncio.get_running_loop().create_future()

    async def on_disconnect() -> None:
        if not gone.done():
            gone.set_result(time.monotonic())

    nc = await nats.connect(
        got["nats_url"],
        user=got["user"],
        password=got["password"],
        inbox_prefix=f"_INBOX.{got['runner_id']}",
        allow_reconnect=False,
        disconnected_cb=on_disconnect,
    )
    try:
        sent = time.monotonic()
        status, _ = await call(
            "DELETE", f"{api}/api/v1/runners/keys/{made['key_id']}", headers=admin
        )
        assert status == 200
        return float(await asyncio.wait_for(gone, 5)) - sent
    finally:
        await nc.close()


def _exchange(api: str, key: str) -> dict[str, str]:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{api}/api/v1/runners/credentials",
        data=b'{"os":"linux","browser":"chromium"}',
        headers={"Content-Type": "application/json", "X-Runner-Key": key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=15) as response:
        answer: dict[str, str] = json.loads(response.read())
        return answer
