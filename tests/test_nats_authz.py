"""NATS with authorization on: each user may do its work and nothing else.

A real nats-server started from the configuration ``tb up`` writes; the runner's
credentials are checked against what the server refuses (a permissions violation) and
against the stream (unchanged), and revocation is timed from the bucket to the
disconnect.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_args

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from engine import nats_permissions
from engine.bus import Bus, BusConfig, CredentialsRefused, without_credentials
from engine.nats_permissions import runner_inbox
from engine.runner_keys import RunnerKeys, issue, password_for, split_key
from schemas import subjects
from schemas.events import RunnerEvents
from schemas.values import Platform
from tests.nats_authz import AuthorizedNats, authorized_nats

RUNNER = "runner_local_1"  # serves linux/chromium
SHORT = 0.5  # seconds a refused JetStream call takes to time out


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[AuthorizedNats]:
    async with authorized_nats(tmp_path) as s:
        yield s


@pytest.fixture
async def engine(server: AuthorizedNats) -> AsyncIterator[Bus]:
    bus = await Bus.connect(server.url("engine"), name="engine", config=BusConfig())
    await bus.provision()
    await bus.ensure_dispatch_consumer("linux", "chromium")
    await bus.ensure_dispatch_consumer("windows", "firefox")
    yield bus
    await bus.close()


class Refusals:
    """A client's asynchronous errors: nats-server says a permissions violation there."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, err: Exception) -> None:
        self.errors.append(str(err))

    async def violation(self, subject: str, within: float = 2.0) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for error in self.errors:
                if "permissions violation" in error.lower() and subject.lower() in error.lower():
                    return error
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {subject}: {self.errors}")


async def connect_runner(server: AuthorizedNats, refusals: Refusals) -> Client:
    return await nats.connect(
        server.url(RUNNER),
        inbox_prefix=runner_inbox(RUNNER),
        error_cb=refusals.record,
        allow_reconnect=False,
    )


async def stream_state(engine: Bus, stream: str = subjects.EVENTS_STREAM) -> tuple[int, int]:
    info = await engine.js.stream_info(stream)
    return int(info.state.messages), int(info.state.last_seq)


async def test_a_runner_publishing_consent_or_job_events_is_refused_and_the_stream_unchanged(
    server: AuthorizedNats, engine: Bus
) -> None:
    before = await stream_state(engine)
    refusals = Refusals()
    nc = await connect_runner(server, refusals)
    js = nc.jetstream(timeout=SHORT)
    try:
        forged = ("tb.consent.x.ConsentGiven", "tb.job.x.JobStarted", "tb.user.u.RoleChanged")
        for subject in forged:
            await nc.publish(subject, b"{}")
            await refusals.violation(subject)
            with pytest.raises(nats.errors.TimeoutError):  # nothing stores it, nothing acks
                await js.publish(subject, b"{}")
        # another runner's lifecycle events, and an event type no runner has, on its own id
        for subject in ("tb.runner.someone_else.RunnerRegistered", f"tb.runner.{RUNNER}.Forged"):
            await nc.publish(subject, b"{}")
            await refusals.violation(subject)
    finally:
        await nc.close()
    assert await stream_state(engine) == before


async def test_a_runner_cannot_read_datasets_delete_a_stream_or_touch_another_platform(
    server: AuthorizedNats, engine: Bus
) -> None:
    refusals = Refusals()
    nc = await connect_runner(server, refusals)
    js = nc.jetstream(timeout=SHORT)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await js.object_store(subjects.DATASETS_BUCKET)
        await refusals.violation(f"STREAM.INFO.OBJ_{subjects.DATASETS_BUCKET}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_stream(subjects.EVENTS_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await js.purge_stream(subjects.EVENTS_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_consumer(subjects.EVENTS_STREAM, "dispatch_linux_chromium")
        # another platform's work: neither a consumer of its own on it nor the shared one
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(
                subjects.EVENTS_STREAM,
                ConsumerConfig(name="sneak", filter_subject="tb.dispatch.windows.firefox"),
            )
        await refusals.violation("CONSUMER.CREATE.TB.sneak.tb.dispatch.windows.firefox")
        with pytest.raises(nats.errors.TimeoutError):  # unfiltered: no filter to check
            await js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig())
        next_other = "$JS.API.CONSUMER.MSG.NEXT.TB.dispatch_windows_firefox"
        await nc.publish(next_other, b'{"batch":1}', reply=f"{runner_inbox(RUNNER)}.x")
        await refusals.violation(next_other)
        # nor change its own platform's consumer (a named create is also an update)
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(
                subjects.EVENTS_STREAM,
                ConsumerConfig(name="dispatch_linux_chromium", filter_subject="tb.job.>"),
            )
        # nor read users through a reader of its own, nor listen on others' inboxes
        with pytest.raises(nats.errors.TimeoutError):
            await js.add_consumer(
                subjects.EVENTS_STREAM, ConsumerConfig(name="users", filter_subject="tb.user.>")
            )
        await nc.subscribe("_INBOX.>")
        await refusals.violation('subscription to "_inbox.>"')
    finally:
        await nc.close()
    assert (await engine.js.stream_info(subjects.EVENTS_STREAM)).config.name == "TB"
    info = await engine.js.consumer_info(subjects.EVENTS_STREAM, "dispatch_linux_chromium")
    assert info.config.filter_subject == "tb.dispatch.linux.chromium"
    assert [c for c in await engine.js.consumers_info(subjects.EVENTS_STREAM)] == [
        c
        for c in await engine.js.consumers_info(subjects.EVENTS_STREAM)
        if c.name in ("dispatch_linux_chromium", "dispatch_windows_firefox")
    ]


async def test_a_runner_does_its_own_work_with_its_credentials(
    server: AuthorizedNats, engine: Bus
) -> None:
    refusals = Refusals()
    bus = await Bus.connect(
        server.url(RUNNER), name="runner", config=BusConfig(), inbox_prefix=runner_inbox(RUNNER)
    )
    bus.nc._error_cb = refusals.record  # type: ignore[assignment]  # see what the server refuses
    try:
        # events of its flows, its own lifecycle, its log lines: stored
        acked = await bus.js.publish("tb.flow.j1.FlowStarted", b"{}", timeout=2)
        assert acked.stream == subjects.EVENTS_STREAM
        await bus.js.publish(f"tb.runner.{RUNNER}.RunnerRegistered", b"{}", timeout=2)
        await bus.js.publish("tb.log.j1", b"{}", timeout=2)
        # its presence key, and no one else's
        presence = await bus.kv(subjects.RUNNERS_BUCKET)
        await presence.put(RUNNER, b"{}")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(presence.put("someone_else", b"{}"), SHORT)
        # screenshots in, proxy secrets read
        shots = await bus.js.object_store(subjects.SCREENSHOTS_BUCKET)
        await shots.put("f1/1/1.png", b"png")
        engine_secrets = await engine.js.create_key_value(bucket=subjects.PROXY_SECRETS_BUCKET)
        await engine_secrets.put("p1", b"secret")
        secrets = await bus.kv(subjects.PROXY_SECRETS_BUCKET)
        assert (await secrets.get("p1")).value == b"secret"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(secrets.put("p1", b"changed"), SHORT)
        # job and consent state as the runner reads it, and its own work queue
        assert await bus.load(subjects.job_stream_filter("j1")) == []
        assert await bus.load(subjects.consent_stream_filter("example.com")) == []
        assert await bus.last_seq() > 0
        await bus.js.consumer_info(subjects.EVENTS_STREAM, "dispatch_linux_chromium")
        await engine.js.publish("tb.dispatch.linux.chromium", b"{}")
        puller = await bus.puller("dispatch_linux_chromium")
        try:
            (msg,) = await puller.fetch(1, 2.0)
            await msg.in_progress()
            await msg.nak(delay=0.1)
            (msg,) = await puller.fetch(1, 2.0)
            await msg.ack_sync(timeout=2)
        finally:
            await puller.close()
    finally:
        await bus.close()
    assert [e for e in refusals.errors if "someone_else" not in e and "p1" not in e] == []


async def test_a_revoked_key_is_disconnected_within_a_second_and_cannot_come_back(
    server: AuthorizedNats, engine: Bus
) -> None:
    keys = RunnerKeys(engine)
    issued = issue("edge-1", "admin")
    await keys.add(issued.record)
    await keys.set_platform(issued.record, Platform(os="linux", browser="chromium"))
    following = asyncio.create_task(server.owner.run(engine))
    try:
        _, secret = split_key(issued.key) or ("", "")
        user, password = issued.record.runner_id, password_for(secret)
        nc = await _connect_when_known(server, user, password)
        disconnected = asyncio.get_running_loop().create_future()

        async def on_disconnect() -> None:
            if not disconnected.done():
                disconnected.set_result(time.monotonic())

        nc._disconnected_cb = on_disconnect  # type: ignore[assignment]
        revoked_at = time.monotonic()
        await keys.remove(issued.record.key_id)
        gone_at = await asyncio.wait_for(disconnected, 5)
        latency = gone_at - revoked_at
        print(f"revocation: bucket purge to disconnect in {latency * 1000:.0f} ms")
        assert latency < 1.0
        await nc.close()
        with pytest.raises(nats.errors.Error):
            await nats.connect(server.bare_url, user=user, password=password, allow_reconnect=False)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


async def _connect_when_known(server: AuthorizedNats, user: str, password: str) -> Client:
    deadline = time.monotonic() + 5
    while True:
        try:
            return await nats.connect(
                server.bare_url,
                user=user,
                password=password,
                inbox_prefix=runner_inbox(user),
                max_reconnect_attempts=0,
                allow_reconnect=False,
            )
        except nats.errors.Error:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_auditor_reads_the_stream_but_cannot_publish_or_purge_and_ops_administers(
    server: AuthorizedNats, engine: Bus
) -> None:
    await engine.js.publish("tb.runner.r1.RunnerDraining", b'{"n":1}')
    refusals = Refusals()
    auditor = await nats.connect(
        server.url("auditor"), error_cb=refusals.record, allow_reconnect=False
    )
    try:
        js = auditor.jetstream(timeout=SHORT)
        sub = await js.subscribe(
            "tb.>", stream=subjects.EVENTS_STREAM, ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )  # fmt: skip
        msg = await sub.next_msg(timeout=2)
        assert msg.subject == "tb.runner.r1.RunnerDraining"
        await sub.unsubscribe()
        before = await stream_state(engine)
        await auditor.publish("tb.job.x.JobStarted", b"{}")
        await refusals.violation("tb.job.x.JobStarted")
        with pytest.raises(nats.errors.TimeoutError):
            await js.purge_stream(subjects.EVENTS_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_consumer(subjects.EVENTS_STREAM, "dispatch_linux_chromium")
        assert await stream_state(engine) == before
    finally:
        await auditor.close()
    ops = await nats.connect(server.url("ops"), allow_reconnect=False)
    try:
        js = ops.jetstream(timeout=2)
        names = {info.config.name for info in await js.streams_info()}
        assert subjects.EVENTS_STREAM in names
        consumers = {c.name for c in await js.consumers_info(subjects.EVENTS_STREAM)}
        assert "dispatch_linux_chromium" in consumers
    finally:
        await ops.close()


def test_the_configuration_keeps_passwords_as_bcrypt_hashes_in_a_private_file(
    tmp_path: Path,
) -> None:
    server = AuthorizedNats(tmp_path)
    server.port = 4222
    server.owner.write({})
    text = server.config_path.read_text()
    config = msgspec.json.decode(text)
    users = {u["user"]: u for u in config["authorization"]["users"]}
    assert set(users) == {"engine", "api", "auditor", "ops", RUNNER}
    for name, user in users.items():
        assert user["password"].startswith("$2b$")
        assert server.credentials.passwords[name] not in text
    assert server.config_path.stat().st_mode & 0o777 == 0o600
    assert server.credentials.path.stat().st_mode & 0o777 == 0o600


def test_a_runners_allow_list_names_its_own_subjects_only() -> None:
    perms = nats_permissions.runner("r7", "windows", "firefox")
    allow = perms.publish_allow or []
    assert not any(s.startswith(("tb.job", "tb.consent", "tb.user", "tb.dispatch")) for s in allow)
    assert not any(s in (">", "tb.>", "$JS.API.>", "tb.runner.>") for s in allow)
    own = sorted(s for s in allow if s.startswith("tb.runner."))
    assert own == [
        f"tb.runner.r7.{kind.__name__}"
        for kind in sorted(get_args(RunnerEvents), key=lambda k: k.__name__)
    ]
    assert perms.subscribe_allow == ["_INBOX.r7.>"]
    assert "$JS.ACK.TB.dispatch_windows_firefox.>" in allow
    assert "$JS.API.CONSUMER.MSG.NEXT.TB.dispatch_linux_chromium" in perms.publish_deny
    assert "$JS.API.CONSUMER.MSG.NEXT.TB.dispatch_windows_firefox" not in perms.publish_deny
    assert not any("tb_datasets" in s or "OBJ_tb_dispatcher" in s for s in allow)


async def test_a_runners_push_reader_delivers_nothing_into_a_stream_or_bucket(
    server: AuthorizedNats, engine: Bus
) -> None:
    """The deliver subject is in the request's body, where permissions cannot look: a
    reader a runner may create can name any. nats-server refuses the stream's own subjects
    and, as checked here, stores none of its deliveries in another stream or bucket."""
    await engine.js.publish("tb.job.j1.JobStarted", b"{}")
    leases = f"KV_{subjects.LEASES_BUCKET}"
    before = [(await engine.js.stream_info(s)).state.messages for s in (leases, "TB_LOGS")]
    nc = await nats.connect(server.url(RUNNER), inbox_prefix=runner_inbox(RUNNER))
    try:
        for name, target in (("p1", f"$KV.{subjects.LEASES_BUCKET}.forged"), ("p2", "tb.log.j1")):
            config = {"name": name, "filter_subject": "tb.job.>", "ack_policy": "none"}
            request = {"stream_name": "TB", "config": {**config, "deliver_subject": target}}
            answer = await nc.request(
                f"$JS.API.CONSUMER.CREATE.TB.{name}.tb.job.>",
                msgspec.json.encode(request),
                timeout=2,
            )
            assert b'"error"' not in answer.data  # it may create it...
        own = {"name": "p3", "filter_subject": "tb.job.>", "deliver_subject": "tb.job.j2.X"}
        answer = await nc.request(
            "$JS.API.CONSUMER.CREATE.TB.p3.tb.job.>",
            msgspec.json.encode({"stream_name": "TB", "config": own}),
            timeout=2,
        )
        assert b'"error"' in answer.data  # ...but never delivering into the stream itself
        await asyncio.sleep(1.5)
    finally:
        await nc.close()
    after = [(await engine.js.stream_info(s)).state.messages for s in (leases, "TB_LOGS")]
    assert after == before  # ...and what it delivers lands in no stream


async def test_wrong_nats_credentials_stop_a_process_at_once_instead_of_retrying(
    server: AuthorizedNats, tmp_path: Path
) -> None:
    wrong = server.url("engine").replace("@", "x@", 1)  # the engine's user, a wrong password
    started = time.monotonic()
    with pytest.raises(CredentialsRefused, match="NATS refuses this user and password"):
        await asyncio.wait_for(Bus.connect(wrong, name="wrong"), 10)
    assert time.monotonic() - started < 5
    assert "x@" not in str(CredentialsRefused(without_credentials(wrong), "r"))
    for command in (
        ["engine", "--nats-url", wrong],
        ["api", "--nats-url", wrong, "--db", str(tmp_path / "read.db"), "--port", "1"],
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *command,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TB_ADMIN_PASSWORD": "a-long-enough-password"},
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode not in (0, None), command
        assert "NATS refuses this user and password" in err.decode(), (command, err[-600:])
        assert "x@" not in err.decode()  # the password is not printed
