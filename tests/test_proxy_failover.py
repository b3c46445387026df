"""Failover within a flow against real local proxies: a dead port, one that answers 502,
wrong credentials, then working HTTP and SOCKS5 ones with credentials. The flow reaches
the site through the first working candidate, reports ProxyFailed for each bad one
before it, and moves on when the proxy in use goes away mid-flow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from nats.aio.msg import Msg

from agents.backoff import Backoff
from agents.proxy_failover import FlowProxies, ProxiesExhausted, ProxyFailure, ProxySecretCache
from agents.reporter import FlowReporter
from engine.bus import Bus
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands
from engine.proxies.tunnel import open_tunnel
from schemas import subjects
from schemas.events import FlowDispatched, ProxyFailed
from schemas.ids import new_id, utcnow
from schemas.proxies import ProxyEndpoint, ProxyError
from tests.proxies import dead_port, http_get, http_proxy, self_signed, socks5_proxy
from tests.sites import RecordingSite, recording_site

USER, PASSWORD = "flow-user", "s3cret-Pa55word"


def work_item(proxies: list[str]) -> FlowDispatched:
    return FlowDispatched(
        id=new_id(),
        at=utcnow(),
        actor="system",
        job_id="job_failover",
        flow_id="job_failover_0_0",
        attempt=1,
        target_index=0,
        url="http://127.0.0.1/",
        clicks=0,
        session_seconds=1,
        allowed_hosts=["127.0.0.1"],
        seed=1,
        proxies=proxies,
    )


def through(site: RecordingSite) -> Callable[[ProxyEndpoint], Awaitable[int]]:
    """A flow's connection: ``GET /`` from the site through a proxy; the answer's status."""

    async def fetch(endpoint: ProxyEndpoint) -> int:
        reader, writer = await open_tunnel(endpoint, site.host, site.port, timeout=3)
        return await http_get(reader, writer, site.host)

    return fetch


class Reported(list[ProxyFailure]):
    """A flow's reports, kept instead of published."""

    async def __call__(self, failure: ProxyFailure) -> None:
        self.append(failure)


async def register(commands: ProxyCommands, url: str) -> str:
    registered, _ = await commands.register(url, None, "test")
    return registered.proxy_id


async def stored_proxy_failures(bus: Bus) -> list[ProxyFailed]:
    found = []
    async for batch in bus.read(1, subjects.ALL_PROXY_FAILURES, follow=False):
        found.extend(env.event for env in batch if isinstance(env.event, ProxyFailed))
    return found


async def raw_stream(bus: Bus) -> list[bytes]:
    """Every message of the events stream, headers and all, undecoded."""
    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    raw = []
    for seq in range(1, info.state.last_seq + 1):
        msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
        raw.append(msg.subject.encode() + repr(msg.headers).encode() + (msg.data or b""))
    return raw


async def test_failover_picks_the_working_proxy_and_reports_the_bad_ones(bus: Bus) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    with recording_site() as site:
        async with (
            http_proxy(answer=502) as bad_gateway,
            http_proxy((USER, PASSWORD)) as working_http,
            socks5_proxy(USER, PASSWORD) as working_socks,
        ):
            creds = f"{USER}:{PASSWORD}"
            dead = await register(commands, f"http://127.0.0.1:{dead_port()}")
            gateway = await register(commands, bad_gateway.url("http"))
            wrong = await register(commands, working_http.url("http", f"{USER}:nope"))
            http_ok = await register(commands, working_http.url("http", creds))
            socks_ok = await register(commands, working_socks.url("socks5", creds))
            candidates = [dead, gateway, wrong, http_ok, socks_ok]

            item = work_item(candidates)
            cache = ProxySecretCache(bus)
            # the flow's reporter as a runner has it (no work item message: nothing to ack)
            reporter = FlowReporter(bus, item, "runner-1", cast(Msg, None), 1)
            flow = FlowProxies.for_flow(item, cache, reporter)

            fetch = through(site)

            assert await flow.open(fetch) == 404  # the site answered through a proxy
            assert flow.current_id == http_ok
            assert working_http.tunnels == [(site.host, site.port)]
            assert await flow.open(fetch) == 404  # the next connection stays on it
            assert len(working_http.tunnels) == 2 and not working_socks.tunnels

        # the HTTP proxy went away (all three closed): a new local SOCKS5 one on a new port
        # is not among the candidates, so the flow runs out of them
        with pytest.raises(ProxiesExhausted):
            await flow.open(fetch)

    await reporter.stored(Backoff("test"))
    kinds = [(f.proxy_id, f.error) for f in flow.failures]
    assert kinds == [
        (dead, "unreachable"),
        (gateway, "refused"),
        (wrong, "auth"),
        (http_ok, "unreachable"),
        (socks_ok, "unreachable"),
    ]
    stored = await stored_proxy_failures(bus)
    assert [(e.proxy_id, e.error, e.n) for e in stored] == [
        (pid, kind, n) for n, (pid, kind) in enumerate(kinds)
    ]
    assert all(e.flow_id == item.flow_id and e.actor == "runner-1" for e in stored)
    assert "502" in stored[1].reason
    assert cache.reads == len(candidates)  # each secret read once, then cached
    for message in await raw_stream(bus):
        assert PASSWORD.encode() not in message and USER.encode() not in message


async def test_a_flow_moves_on_mid_flow_and_concurrent_failures_report_once(bus: Bus) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    creds = f"{USER}:{PASSWORD}"
    with recording_site() as site:
        async with socks5_proxy(USER, PASSWORD) as socks:
            first_port = dead_port()
            async with http_proxy(port=first_port) as first:
                first_id = await register(commands, first.url("http"))
                socks_id = await register(commands, socks.url("socks5", creds))
                reported = Reported()
                flow = FlowProxies([first_id, socks_id], ProxySecretCache(bus), reported)

                fetch = through(site)

                assert await flow.open(fetch) == 404
                assert flow.current_id == first_id
            # the proxy in use is gone: eight connections at once fail over together
            results = await asyncio.gather(*(flow.open(fetch) for _ in range(8)))
            assert results == [404] * 8
            assert flow.current_id == socks_id and len(socks.tunnels) == 8
    assert [(f.proxy_id, f.error) for f in reported] == [(first_id, "unreachable")]


async def test_a_candidate_without_a_secret_is_reported_and_skipped(bus: Bus) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    with recording_site() as site:
        async with http_proxy() as proxy:
            retired = await register(commands, proxy.url("http"))
            await commands.retire(retired, "gone", "test")  # its secret is purged
            working = await register(commands, proxy.url("http"))
            reported = Reported()
            flow = FlowProxies([retired, working], ProxySecretCache(bus), reported)

            fetch = through(site)

            assert await flow.open(fetch) == 404
    assert [(f.proxy_id, f.error) for f in reported] == [(retired, "no_secret")]


async def test_no_candidates_means_direct() -> None:
    async def report(failure: ProxyFailure) -> None:
        raise AssertionError("nothing to report")

    class NoSecrets:
        async def get(self, proxy_id: str) -> ProxyEndpoint | None:
            return None

    flow = FlowProxies([], NoSecrets(), report)
    assert flow.direct
    with pytest.raises(ProxiesExhausted):
        await flow.current()


async def test_an_https_proxy_is_spoken_to_over_tls_and_its_certificate_checked(
    bus: Bus, tmp_path: Path
) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    commands = ProxyCommands(bus, ProxySecrets(bus))
    with recording_site() as site:
        async with http_proxy((USER, PASSWORD), tls=server_tls) as proxy:
            pid = await register(commands, proxy.url("https", f"{USER}:{PASSWORD}"))
            endpoint = await ProxySecretCache(bus).get(pid)
            assert endpoint is not None and endpoint.scheme == "https"
            # the system's trust store does not know this certificate: the proxy fails
            with pytest.raises(ProxyError) as refused:
                await open_tunnel(endpoint, site.host, site.port, timeout=3)
            assert refused.value.kind == "protocol" and "TLS" in str(refused.value)
            reader, writer = await open_tunnel(
                endpoint, site.host, site.port, timeout=3, tls=client_tls
            )
            assert await http_get(reader, writer, site.host) == 404
            assert proxy.tunnels == [(site.host, site.port)]


class TunnelFailed(Exception):
    """Another tunnel function's own error type, raised ``from`` what caused it."""


async def test_another_tunnel_functions_errors_are_judged_by_their_cause() -> None:
    endpoints = {pid: ProxyEndpoint("http", "127.0.0.1", n + 1) for n, pid in enumerate("abcd")}

    class Known:
        async def get(self, proxy_id: str) -> ProxyEndpoint | None:
            return endpoints[proxy_id]

    causes: list[BaseException] = [TimeoutError(), ConnectionRefusedError(), ValueError()]

    async def attempt(endpoint: ProxyEndpoint) -> int:
        if causes:
            raise TunnelFailed(f"{endpoint.label} failed") from causes.pop(0)
        return endpoint.port

    reported = Reported()
    flow = FlowProxies(list(endpoints), Known(), reported, errors=(TunnelFailed,))
    assert await flow.open(attempt) == 4
    assert [f.error for f in reported] == ["timeout", "unreachable", "refused"]
