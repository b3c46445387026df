"""Proxy health end to end on a real nats-server: flows of a runner fail over from a proxy
that went down (ProxyFailed), the engine marks it bad, new work items leave it out, its
check fails while it is down (the cool-down is extended) and passes once it is back, and
it is handed out again. No credential ever reaches the events stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import cast

import nats.errors
import pytest
from nats.aio.msg import Msg

from agents.backoff import Backoff
from agents.proxy_failover import FlowProxies, ProxiesExhausted, ProxySecretCache
from agents.reporter import FlowReporter
from engine.bus import Bus
from engine.jobs.decider import CancelJob
from engine.proxies.decider import HealthPolicy
from engine.proxies.health import ProxyHealth
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands
from engine.proxies.tunnel import open_tunnel
from schemas import subjects
from schemas.events import (
    Envelope,
    FlowDispatched,
    FlowDone,
    ProxyCheckFailed,
    ProxyMarkedBad,
    ProxyRestored,
    decode_event,
)
from schemas.ids import new_id, utcnow
from schemas.proxies import ProxyEndpoint
from schemas.values import ProxyPool, Target
from tests.conftest import NatsServer
from tests.harness import embedded, log_until
from tests.proxies import dead_port, http_get, http_proxy, socks5_proxy
from tests.sites import recording_site
from tests.test_proxy_failover import raw_stream

USER, PASSWORD = "pool-user", "Pool-Pa55-word"
POLICY = HealthPolicy(
    failures=3,
    window=timedelta(seconds=30),
    cooldown=timedelta(seconds=1),
    max_cooldown=timedelta(seconds=2),
    check_timeout=2.0,
)


@pytest.mark.slow
async def test_bad_proxy_is_left_out_checked_and_restored(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    creds = f"{USER}:{PASSWORD}"
    taken = WorkItems()
    seen = taken.items
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        token, _ = await tb.consents.claim("127.0.0.1", "test")
        with recording_site(token=token) as site:
            # the check tunnels to the consented host on the port it was verified on
            await tb.consents.verify(site.host, site.base_url, "test")
            async with socks5_proxy(USER, PASSWORD) as socks:
                async with http_proxy((USER, PASSWORD)) as first:
                    a_port = first.port
                    a, _ = await commands.register(first.url("http", creds), "pool", "test")
                    b, _ = await commands.register(socks.url("socks5", creds), "pool", "test")
                    tb.run(ProxyHealth(bus, POLICY, tick_interval=0.1).run(), "proxy-health")
                    job_id = await tb.create_job(
                        [Target(url=f"{site.base_url}/", flows=2000)],
                        instance_count=2,
                        proxies=ProxyPool(label="pool"),
                        proxy_switching=True,
                    )
                    tb.run(runner(bus, site.host, site.port, taken), "runner")
                    await taken.until(
                        lambda: {a.proxy_id, b.proxy_id} <= {c[0] for _, c in seen if c}
                    )
                # proxy A is gone: flows that start with it fail over to B and report it
                marked = await first_event(bus, a.proxy_id, ProxyMarkedBad)
                checked = await first_event(bus, a.proxy_id, ProxyCheckFailed)
                assert isinstance(checked.event, ProxyCheckFailed)
                assert checked.event.bad_until - checked.event.at == POLICY.max_cooldown
                async with http_proxy((USER, PASSWORD), port=a_port):
                    restored = await first_event(bus, a.proxy_id, ProxyRestored)
                    assert isinstance(restored.event, ProxyRestored)
                    assert "tunnel through" in restored.event.check
                    await taken.until(
                        lambda: any(s > restored.seq and a.proxy_id in c for s, c in seen)
                    )
                await tb.jobs.execute(CancelJob(job_id), "test")
        assert isinstance(marked.event, ProxyMarkedBad) and marked.event.failures >= 3
        while_bad = [c for s, c in seen if marked.seq < s < restored.seq]
        assert while_bad and all(c == [b.proxy_id] for c in while_bad)
        assert all(set(c) == {a.proxy_id, b.proxy_id} for s, c in seen if s < marked.seq)
    for message in await raw_stream(bus):
        assert PASSWORD.encode() not in message and USER.encode() not in message


class WorkItems:
    """The stream sequence and candidates of each work item the runner took."""

    def __init__(self) -> None:
        self.items: list[tuple[int, list[str]]] = []
        self._changed = asyncio.Condition()

    async def add(self, seq: int, proxies: list[str]) -> None:
        async with self._changed:
            self.items.append((seq, proxies))
            self._changed.notify_all()

    async def until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(condition)


async def first_event(bus: Bus, proxy_id: str, kind: type) -> Envelope:
    found = await log_until(
        bus, subjects.proxy_stream_filter(proxy_id), lambda env: isinstance(env.event, kind)
    )
    return found[-1]


async def runner(bus: Bus, host: str, port: int, taken: WorkItems) -> None:
    """A runner in miniature: each work item's flow fetches the site through its proxy
    candidates (failing over, reporting ProxyFailed), then is done."""
    sub = await bus.js.pull_subscribe_bind(
        subjects.dispatch_consumer("linux", "chromium"), stream=subjects.EVENTS_STREAM
    )
    secrets = ProxySecretCache(bus)

    async def fetch(endpoint: ProxyEndpoint) -> int:
        reader, writer = await open_tunnel(endpoint, host, port, timeout=2)
        return await http_get(reader, writer, host)

    async def run(msg: object) -> None:
        item = decode_event(msg.data)  # type: ignore[attr-defined]
        assert isinstance(item, FlowDispatched)
        await taken.add(msg.metadata.sequence.stream, list(item.proxies))  # type: ignore[attr-defined]
        reporter = FlowReporter(bus, item, "runner-1", cast(Msg, msg), 1)
        flow = FlowProxies.for_flow(item, secrets, reporter)
        with contextlib.suppress(ProxiesExhausted):
            await flow.open(fetch)
        await reporter.stored(Backoff("test"))
        await asyncio.sleep(0.05)
        done = FlowDone(
            id=new_id(),
            at=utcnow(),
            actor="runner-1",
            job_id=item.job_id,
            flow_id=item.flow_id,
            attempt=item.attempt,
            runner_id="runner-1",
            target_index=item.target_index,
        )
        await bus.append(done, msg_id=subjects.flow_msg_id(done))
        await msg.ack()  # type: ignore[attr-defined]

    while True:
        with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
            msgs = await sub.fetch(2, timeout=1)
            await asyncio.gather(*(run(m) for m in msgs))


async def report_failures(bus: Bus, proxy_id: str, count: int) -> None:
    """``count`` ProxyFailed for ``proxy_id``, as runners' flows report them."""
    for n in range(count):
        item = FlowDispatched(
            id=new_id(), at=utcnow(), actor="system", job_id="job_x", flow_id=f"job_x_0_{n}",
            attempt=1, target_index=0, url="http://127.0.0.1/", clicks=0, session_seconds=1,
            allowed_hosts=["127.0.0.1"], seed=1, proxies=[proxy_id],
        )  # fmt: skip
        reporter = FlowReporter(bus, item, "runner-1", cast(Msg, None), 1)
        await reporter.proxy_failed(proxy_id, "http://127.0.0.1:1", "unreachable", "refused")
        await reporter.stored(Backoff("test"))


async def test_two_engines_record_each_health_step_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    policy = HealthPolicy(failures=3, cooldown=timedelta(seconds=0.5), check_timeout=2.0)
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        token, _ = await tb.consents.claim("127.0.0.1", "test")
        with recording_site(token=token) as site:
            await tb.consents.verify(site.host, site.base_url, "test")
            async with http_proxy() as proxy:
                registered, _ = await commands.register(proxy.url("http"), None, "test")
                pid = registered.proxy_id
                for n in range(2):
                    tb.run(ProxyHealth(bus, policy, tick_interval=0.05).run(), f"health-{n}")
                await report_failures(bus, pid, 3)
                await first_event(bus, pid, ProxyRestored)
                assert proxy.tunnels == [(site.host, site.port)] * len(proxy.tunnels)
    kinds = [type(env.event).__name__ for env in await bus.load(subjects.proxy_stream_filter(pid))]
    assert kinds == ["ProxyRegistered", "ProxyMarkedBad", "ProxyRestored"]


async def test_a_check_without_the_proxys_secret_fails(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    secrets = ProxySecrets(bus)
    commands = ProxyCommands(bus, secrets)
    policy = HealthPolicy(failures=2, cooldown=timedelta(seconds=0.2), check_timeout=1.0)
    registered, _ = await commands.register("http://127.0.0.1:3128", None, "test")
    pid = registered.proxy_id
    await secrets.purge(pid)
    health = ProxyHealth(bus, policy, tick_interval=0.05)
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        tb.run(health.run(), "health")
        await report_failures(bus, pid, 2)
        checked = await first_event(bus, pid, ProxyCheckFailed)
    assert isinstance(checked.event, ProxyCheckFailed)
    assert checked.event.reason.startswith("no_secret")
    assert health.proxies[pid].status == "bad"


async def test_a_check_that_cannot_reach_one_consented_host_tries_the_next(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    policy = HealthPolicy(failures=2, cooldown=timedelta(seconds=0.2), check_timeout=2.0)
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        token, _ = await tb.consents.claim("127.0.0.1", "test")
        with recording_site(token=token) as gone:
            await tb.consents.verify(gone.host, gone.base_url, "test")
        # verified on a port where nothing listens any more: the proxy answers 502 there
        token, _ = await tb.consents.claim("localhost", "test")
        with recording_site(token=token) as site:
            await tb.consents.verify("localhost", f"http://localhost:{site.port}", "test")
            async with http_proxy() as proxy:
                registered, _ = await commands.register(proxy.url("http"), None, "test")
                tb.run(ProxyHealth(bus, policy, tick_interval=0.05).run(), "health")
                await report_failures(bus, registered.proxy_id, 2)
                restored = await first_event(bus, registered.proxy_id, ProxyRestored)
    assert isinstance(restored.event, ProxyRestored)
    assert restored.event.check.endswith(f"to localhost:{site.port}")
    assert proxy.tunnels == [("localhost", site.port)]


async def test_tb_engine_runs_the_health_service_with_its_settings(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_PROXY_FAILURES", "2")
    monkeypatch.setenv("TB_PROXY_COOLDOWN", "0.3")
    commands = ProxyCommands(bus, ProxySecrets(bus))
    registered, _ = await commands.register(f"http://127.0.0.1:{dead_port()}", None, "test")
    pid = registered.proxy_id
    async with embedded(bus, nats_server.url, tmp_path, dispatcher=False) as tb:
        await tb.spawn_engine()
        await report_failures(bus, pid, 2)
        marked = await first_event(bus, pid, ProxyMarkedBad)
        checked = await first_event(bus, pid, ProxyCheckFailed)
    assert isinstance(marked.event, ProxyMarkedBad) and marked.event.failures == 2
    assert isinstance(checked.event, ProxyCheckFailed)
    # no consent in this log: the check could only connect to the proxy itself
    assert checked.event.reason.startswith("unreachable")
    assert (checked.event.at - marked.event.bad_until).total_seconds() >= 0
