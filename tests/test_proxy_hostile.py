"""Hostile and broken upstream proxies behind the egress proxy, over real loopback sockets.

127.0.0.1 is the consented site; 127.0.0.2 an unauthorised host that must never see a
connection. Each upstream here misbehaves in one way (answers and closes, never answers,
answers without end, redirects, echoes the credentials, speaks broken SOCKS5); the flow
must move on to its next candidate or fail, never connect directly, report each failure
once, and never write a password anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog

from agents.egress import upstream
from agents.egress.proxy import EgressProxy, FlowEgress
from agents.executor import AllowedHosts
from agents.proxy_failover import FlowProxies, ProxySecretCache
from engine.bus import Bus
from engine.proxies.secrets import ProxySecrets
from engine.proxies.tunnel import open_tunnel
from schemas.proxies import ProxyEndpoint, ProxyError
from tests.proxies import (
    LocalProxy,
    dead_port,
    http_get,
    http_proxy,
    self_signed,
    serving,
    socks5_proxy,
)
from tests.test_egress_proxy import (
    Client,
    Failures,
    Origin,
    Refusals,
    Secrets,
    chained,
    connect,
    evil,
    local,
    proxy,
    register,
    site,
)

__all__ = ["evil", "proxy", "site"]
pytestmark = pytest.mark.timeout(30)
WAIT = 5.0
PASSWORD = "Zq9-very-secret-pw"
TOKEN = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script, host: str = "127.0.0.1") -> AsyncIterator[LocalProxy]:
    """An upstream that reads a CONNECT head, then does what ``script`` says."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        await script(reader, writer)

    async with serving(LocalProxy(0, host), handle) as upstream:
        try:
            yield upstream
        finally:
            for writer in writers:
                writer.transport.abort()


def answering(raw: bytes, then: str = "close") -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        if then == "hang":
            await asyncio.sleep(3600)
        writer.close()

    return script


async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A slow loris: reads whatever comes and never says a word, until the peer goes."""
    await reader.read()
    writer.transport.abort()


async def dripping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A head that never ends: a header line every 50 ms."""
    writer.write(b"HTTP/1.1 200 OK\r\n")
    while True:
        writer.write(b"X-Drip: 1\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


def ports_of(origin: Origin) -> dict[str, frozenset[int]]:
    return {origin.host: frozenset({origin.port})}


async def connect_status(egress: EgressProxy, flow: FlowEgress, origin: Origin) -> int:
    client = await connect(egress)
    status, _ = await client.ask(f"CONNECT {origin.host}:{origin.port} HTTP/1.1", flow)
    return status


async def connect_at_once(
    egress: EgressProxy, flow: FlowEgress, origin: Origin, count: int
) -> tuple[list[Client], list[int]]:
    """``count`` connections of the flow asking for ``origin`` together: their answers."""
    clients = [await connect(egress) for _ in range(count)]
    line = f"CONNECT {origin.host}:{origin.port} HTTP/1.1"
    answers = await asyncio.gather(*(c.ask(line, flow) for c in clients))
    return clients, [status for status, _ in answers]


# -- hostile HTTP CONNECT answers -------------------------------------------------------


async def test_an_upstream_that_answers_200_and_closes_never_leads_to_a_direct_connection(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    async with scripted(answering(b"HTTP/1.1 200 OK\r\n\r\n")) as liar:
        proxies, failures = chained(Secrets(), local(liar, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await asyncio.wait_for(client.reader.read(), WAIT) == b""
    assert site.connections == 0 and evil.connections == 0 and not failures


async def test_bytes_after_the_upstreams_200_head_are_the_tunnels_first_bytes(
    proxy: EgressProxy, site: Origin
) -> None:
    async def banner_then_splice(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        remote_reader, remote_writer = await asyncio.open_connection(site.host, site.port)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nBANNER\n")
        await writer.drain()
        while data := await reader.read(1024):
            remote_writer.write(data)
            writer.write(await remote_reader.readexactly(len(data)))
            await writer.drain()

    async with scripted(banner_then_splice) as upstream_proxy:
        proxies, failures = chained(Secrets(), local(upstream_proxy, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await asyncio.wait_for(client.reader.readexactly(7), WAIT) == b"BANNER\n"
        assert await client.echo(b"then echo\n") == b"then echo\n"
    assert not failures


@pytest.mark.parametrize(
    ("script", "kind"),
    [
        (never_answers, "timeout"),  # slow loris: accepts, never answers
        (dripping, "timeout"),  # a head that never ends
        (answering(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000, "hang"), "protocol"),
        (answering(b"HTTP/1.1 200 OK\r\n" + b"X-Big: a\r\n" * 2_000 + b"\r\n"), "protocol"),
        (answering(b"SSH-2.0-OpenSSH\r\n\r\n"), "protocol"),
        (answering(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2/\r\n\r\n"), "refused"),
        (answering(b""), "protocol"),
        (answering(b"HTTP/1.1 \xb2\xb3\xb9 OK\r\n\r\n"), "protocol"),  # digits, not ASCII ones
    ],
    ids=["slow-loris", "endless-head", "huge-head", "long-head", "not-http", "redirect",
         "closes", "superscript-status"],
)  # fmt: skip
async def test_a_broken_upstream_is_reported_once_and_the_next_one_carries_the_flow(
    proxy: EgressProxy,
    site: Origin,
    evil: Origin,
    monkeypatch: pytest.MonkeyPatch,
    script: Script,
    kind: str,
) -> None:
    monkeypatch.setattr(upstream, "CONNECT_TIMEOUT", 0.5)
    async with scripted(script) as broken, http_proxy() as working:
        proxies, failures = chained(Secrets(), local(broken, "http"), local(working, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        started = time.monotonic()
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert time.monotonic() - started < 2.0  # bounded by the connect timeout
        assert await client.echo(b"next one\n") == b"next one\n"
    assert [f.error for f in failures] == [kind]
    assert working.tunnels == [("127.0.0.1", site.port)] and evil.connections == 0


async def test_an_upstream_echoing_the_credentials_does_not_put_them_in_the_failure(
    proxy: EgressProxy, site: Origin
) -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        echoed = head.split(b"Proxy-Authorization: ", 1)[1].split(b"\r\n", 1)[0]
        writer.write(b"HTTP/1.1 403 " + echoed + b" user:" + PASSWORD.encode() + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serving(LocalProxy(0), handle) as echoing:
        proxies, failures = chained(Secrets(), local(echoing, "http", "user", PASSWORD))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        assert await connect_status(proxy, flow, site) == 502
    assert TOKEN.encode() in heads[0]  # it did get them, and echoed them
    assert [f.error for f in failures] == ["refused"]
    assert PASSWORD not in failures[0].reason and TOKEN not in failures[0].reason


# -- hostile SOCKS5 answers --------------------------------------------------------------


def socks_script(greeting: bytes, auth: bytes = b"\x01\x00", reply: bytes = b"") -> Script:
    """A SOCKS5 server answering with these bytes, then splicing to the site when the
    reply says it succeeded."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)  # version 5, one method: username/password
        writer.write(greeting)
        await writer.drain()
        if greeting[1:2] != b"\x02":
            return
        _, size = await reader.readexactly(2)
        await reader.readexactly(size)
        (size,) = await reader.readexactly(1)
        await reader.readexactly(size)
        writer.write(auth)
        await writer.drain()
        if auth != b"\x01\x00":
            return
        await reader.readexactly(4 + 4 + 2)  # an IPv4 CONNECT: the egress sends addresses
        writer.write(reply)
        await writer.drain()
        if reply[:2] == b"\x05\x00" and len(reply) > 5:
            while data := await reader.read(1024):
                writer.write(data)  # echo, as the site would
                await writer.drain()
        writer.close()

    return script


@contextlib.asynccontextmanager
async def socks_server(script: Script) -> AsyncIterator[LocalProxy]:
    async with serving(LocalProxy(0), script) as server:
        yield server


@pytest.mark.parametrize(
    ("script", "kind"),
    [
        (socks_script(b"\x04\x02"), "protocol"),  # wrong version
        (socks_script(b"\x05\xff"), "auth"),  # no acceptable method
        (socks_script(b"\x05\x00"), "auth"),  # offers no authentication instead
        (socks_script(b"\x05\x02", b"\x01\x01"), "auth"),
        (socks_script(b"\x05\x02", reply=b"\x04\x00\x00\x01" + bytes(6)), "protocol"),
        (socks_script(b"\x05\x02", reply=b"\x05\x02\x00\x01" + bytes(6)), "refused"),
        (socks_script(b"\x05\x02", reply=b"\x05\x00\x00\x09" + bytes(6)), "protocol"),
        (socks_script(b"\x05\x02", reply=b"\x05\x00\x00\x03\xff"), "protocol"),  # cut short
    ],
    ids=["version", "method-ff", "method-none", "auth-refused", "reply-version",
         "ruleset", "address-type", "truncated"],
)  # fmt: skip
async def test_a_broken_socks5_upstream_is_reported_and_the_next_one_carries_the_flow(
    proxy: EgressProxy, site: Origin, evil: Origin, script: Script, kind: str
) -> None:
    async with socks_server(script) as broken, socks5_proxy("user", PASSWORD) as working:
        endpoints = [local(p, "socks5", "user", PASSWORD) for p in (broken, working)]
        proxies, failures = chained(Secrets(), *endpoints)
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"via socks\n") == b"via socks\n"
    assert [f.error for f in failures] == [kind]
    assert all(PASSWORD not in f.reason for f in failures)
    assert working.tunnels == [("127.0.0.1", site.port)] and evil.connections == 0


async def test_a_socks5_reply_with_a_domain_bound_address_is_a_working_tunnel(
    proxy: EgressProxy, site: Origin
) -> None:
    bound = b"\x05\x00\x00\x03\x0bexample.org" + struct.pack("!H", 1080)
    async with socks_server(socks_script(b"\x05\x02", reply=bound)) as server:
        proxies, failures = chained(Secrets(), local(server, "socks5", "user", PASSWORD))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"domain bound\n") == b"domain bound\n"
    assert not failures


# -- many connections of one flow while its candidate dies -----------------------------


async def test_concurrent_connections_on_a_dying_candidate_report_once_and_move_on_once(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    async with http_proxy() as second:
        async with http_proxy() as first:
            proxies, failures = chained(
                Secrets(), local(first, "http"), local(second, "http"), local(first, "http")
            )
            flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                            proxies=proxies)  # fmt: skip
            assert await connect_status(proxy, flow, site) == 200
        # the first candidate is gone: twenty connections at once find out together
        clients, statuses = await connect_at_once(proxy, flow, site, 20)
        assert statuses == [200] * 20
        for client in clients:
            assert await client.echo(b"together\n") == b"together\n"
    assert [(f.proxy, f.error, f.n) for f in failures] == [
        (local(first, "http").label, "unreachable", 0)
    ]
    assert proxies.current_id == "p1" and len(second.tunnels) == 20
    assert site.connections == 21 and evil.connections == 0


async def test_concurrent_connections_waiting_on_a_silent_candidate_report_it_once(
    proxy: EgressProxy, site: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "CONNECT_TIMEOUT", 0.5)
    async with scripted(never_answers) as silent, http_proxy() as working:
        proxies, failures = chained(Secrets(), local(silent, "http"), local(working, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        started = time.monotonic()
        _, statuses = await connect_at_once(proxy, flow, site, 20)
        assert time.monotonic() - started < 2.0  # one timeout, waited out together
        assert statuses == [200] * 20
    assert silent.connections == 20 and len(working.tunnels) == 20
    assert [(f.proxy_id, f.error) for f in failures] == [("p0", "timeout")]


# -- secrets, logs, plain http, IPv6 ----------------------------------------------------


async def test_candidates_with_malformed_secrets_are_skipped_as_no_secret(
    bus: Bus, proxy: EgressProxy, site: Origin
) -> None:
    kv = await ProxySecrets(bus).bucket()
    await kv.put("not-json", b"{not json")
    await kv.put("bad-scheme", b'{"scheme":"ftp","host":"127.0.0.1","port":1}')
    await kv.put("bad-port", b'{"scheme":"http","host":"127.0.0.1","port":70000}')
    await kv.put("no-host", b'{"scheme":"http","host":"","port":3128}')
    await kv.put("bad-host", b'{"scheme":"http","host":"a b\\r\\nc","port":3128}')
    long = "u" * 300
    await kv.put(
        "long-user",
        f'{{"scheme":"socks5","host":"127.0.0.1","port":1,"username":"{long}","password":"p"}}'.encode(),
    )
    async with http_proxy() as working:
        await kv.put("ok", f'{{"scheme":"http","host":"127.0.0.1","port":{working.port}}}'.encode())
        failures = Failures()
        ids = ["not-json", "bad-scheme", "bad-port", "no-host", "bad-host", "long-user", "ok"]
        proxies = FlowProxies(ids, ProxySecretCache(bus), failures)
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        assert await connect_status(proxy, flow, site) == 200
    assert [(f.proxy_id, f.error) for f in failures] == [(i, "no_secret") for i in ids[:-1]]
    assert proxy.open_connections == 1  # the one tunnel, no handler died on a bad secret


async def test_no_password_in_logs_failures_or_reprs(
    proxy: EgressProxy, site: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        http_proxy(("user", "wrong")) as refusing,
        socks5_proxy("user", "wrong") as socks_refusing,
        scripted(never_answers) as silent,
    ):
        endpoints = [
            local(refusing, "http", "user", PASSWORD),
            local(socks_refusing, "socks5", "user", PASSWORD),
            local(silent, "https", "user", PASSWORD),  # TLS to a server that never answers
            ProxyEndpoint("http", "127.0.0.1", dead_port(), "user", PASSWORD),
        ]
        secrets = Secrets()
        proxies, failures = chained(secrets, *endpoints)
        with structlog.testing.capture_logs() as logs:
            flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                            proxies=proxies)  # fmt: skip
            upstream.CONNECT_TIMEOUT, saved = 0.5, upstream.CONNECT_TIMEOUT
            try:
                assert await connect_status(proxy, flow, site) == 502
            finally:
                upstream.CONNECT_TIMEOUT = saved
        errors = []
        for endpoint in endpoints:
            try:
                await open_tunnel(endpoint, "127.0.0.1", site.port, timeout=0.5)
            except ProxyError as err:
                errors.append(err)
    assert [f.error for f in failures] == ["auth", "auth", "timeout", "unreachable"]
    assert len(errors) == 4
    seen = " ".join(
        [caplog.text, repr(logs), repr(failures), repr(secrets), repr(proxies.__dict__), repr(flow)]
        + [f"{e!r} {e} {e.__cause__!r} {e.__context__!r}" for e in errors]
    )
    assert PASSWORD not in seen and TOKEN not in seen
    assert site.connections == 0


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_plain_http_is_forwarded_through_the_upstream_on_a_kept_connection(
    proxy: EgressProxy, site: Origin, evil: Origin, scheme: str
) -> None:
    server = http_proxy(("user", PASSWORD)) if scheme == "http" else socks5_proxy("user", PASSWORD)
    async with server as upstream_proxy:
        proxies, failures = chained(Secrets(), local(upstream_proxy, scheme, "user", PASSWORD))  # type: ignore[arg-type]
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        for path in ("/one", "/two"):
            status, _ = await client.ask(
                f"GET http://127.0.0.1:{site.port}{path} HTTP/1.1", flow, "Host: 127.0.0.1"
            )
            assert status == 200
            assert await asyncio.wait_for(client.reader.readexactly(5), WAIT) == b"hello"
        status, _ = await client.ask(
            f"GET http://127.0.0.2:{evil.port}/ HTTP/1.1", flow, "Host: 127.0.0.2"
        )
        assert status == 403
    assert upstream_proxy.tunnels == [("127.0.0.1", site.port)]  # one kept tunnel, two requests
    assert [h.split(b" ")[1] for h in site.heads] == [b"/one", b"/two"]
    assert all(b"Proxy-Authorization" not in h for h in site.heads)
    assert evil.connections == 0 and not failures


@pytest.fixture
async def site6() -> AsyncIterator[Origin]:
    origin = await Origin("::1").start()
    yield origin
    await origin.stop()


@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_ipv6_literal_targets_are_chained_by_address(
    proxy: EgressProxy, site6: Origin, scheme: str
) -> None:
    server = http_proxy(("user", PASSWORD)) if scheme == "http" else socks5_proxy("user", PASSWORD)
    async with server as upstream_proxy:
        proxies, failures = chained(Secrets(), local(upstream_proxy, scheme, "user", PASSWORD))  # type: ignore[arg-type]
        flow = register(proxy, AllowedHosts(["::1"]), {"::1": frozenset({site6.port})}, Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT [::1]:{site6.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"six\n") == b"six\n"
        client = await connect(proxy)
        status, _ = await client.ask(f"GET http://[::1]:{site6.port}/ HTTP/1.1", flow, "Host: x")
        assert status == 200
        # the IPv4-mapped form of a consented v6 loopback is another address: not consented
        assert (
            await (await connect(proxy)).ask(
                f"CONNECT [::ffff:127.0.0.2]:{site6.port} HTTP/1.1", flow
            )
        )[0] == 403
    assert upstream_proxy.tunnels == [("::1", site6.port)] * 2 and not failures


async def test_an_upstream_on_an_ipv6_address_is_spoken_to_there(
    proxy: EgressProxy, site: Origin
) -> None:
    async with http_proxy(("user", PASSWORD), host="::1") as upstream_proxy:
        endpoint = local(upstream_proxy, "http", "user", PASSWORD)
        proxies, failures = chained(Secrets(), endpoint)
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"over v6\n") == b"over v6\n"
    assert endpoint.label == f"http://[::1]:{upstream_proxy.port}" and not failures


# -- a flow ends while a connection is mid-failover ------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("end", ["unregister", "revoke"])
async def test_a_flow_ending_mid_failover_stops_its_connection_at_once(
    proxy: EgressProxy,
    site: Origin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    end: str,
) -> None:
    """The flow is unregistered, or its host revoked, while a connection waits on a
    silent candidate: the connection closes at once and goes no further."""
    monkeypatch.setattr(upstream, "CONNECT_TIMEOUT", 1.5)
    arrived = asyncio.Event()

    async def silent_script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.set()
        await never_answers(reader, writer)

    async with scripted(silent_script) as silent, http_proxy() as working:
        await asyncio.sleep(0)
        fds, tasks = open_fds(), len(asyncio.all_tasks())
        proxies, failures = chained(Secrets(), local(silent, "http"), local(working, "http"))
        hosts = AllowedHosts(["127.0.0.1"])
        flow = register(proxy, hosts, ports_of(site), Refusals(), proxies=proxies)
        client = await connect(proxy)
        client.writer.write(
            f"CONNECT 127.0.0.1:{site.port} HTTP/1.1\r\n".encode()
            + b"Proxy-Authorization: Basic "
            + base64.b64encode(f"{flow.username}:{flow.password}".encode())
            + b"\r\n\r\n"
        )
        await asyncio.wait_for(arrived.wait(), WAIT)  # waiting on the silent candidate
        started = time.monotonic()
        if end == "unregister":
            proxy.unregister(flow)
        else:
            hosts.revoke("127.0.0.1")
        assert await asyncio.wait_for(client.reader.read(), WAIT) == b""
        assert time.monotonic() - started < 1.0
        client.writer.close()
        await asyncio.sleep(2.0)  # past the silent candidate's timeout
        assert not failures and not working.tunnels and working.connections == 0
        assert proxy.open_connections == 0
        assert len(asyncio.all_tasks()) <= tasks
        assert open_fds() <= fds
    assert site.connections == 0
    assert "Exception in callback" not in caplog.text and "Unhandled" not in caplog.text


# -- where the operator's proxy is ------------------------------------------------------


async def test_an_upstream_on_an_unconsented_address_is_used_as_the_proxy_only(
    proxy: EgressProxy, site: Origin
) -> None:
    async with http_proxy(host="127.0.0.2") as upstream_proxy:
        proxies, failures = chained(Secrets(), local(upstream_proxy, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"via 127.0.0.2\n") == b"via 127.0.0.2\n"
        # the page cannot reach the proxy's own address: it is not consented
        for line in (
            f"CONNECT 127.0.0.2:{upstream_proxy.port} HTTP/1.1",
            f"GET http://127.0.0.2:{upstream_proxy.port}/ HTTP/1.1",
        ):
            assert (await (await connect(proxy)).ask(line, flow, "Host: 127.0.0.2"))[0] == 403
    assert upstream_proxy.connections == 1 and upstream_proxy.tunnels == [("127.0.0.1", site.port)]
    assert not failures


# -- digits that are not ASCII ones --------------------------------------------------------


async def test_non_ascii_digits_in_a_site_answer_or_a_connect_target_are_refused_cleanly(
    proxy: EgressProxy, caplog: pytest.LogCaptureFixture
) -> None:
    framed = b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n"
    answers = [b"HTTP/1.1 \xb200 OK\r\n\r\n", framed]

    async def odd_site(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()

    async with serving(LocalProxy(0), odd_site) as odd:
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({odd.port})},
                        Refusals())  # fmt: skip
        line = f"GET http://127.0.0.1:{odd.port}/ HTTP/1.1"
        assert (await (await connect(proxy)).ask(line, flow, "Host: x"))[0] == 502
        client = await connect(proxy)
        secret = base64.b64encode(f"{flow.username}:{flow.password}".encode())
        client.writer.write(f"{line}\r\nHost: x\r\n".encode() + b"Proxy-Authorization: Basic "
                            + secret + b"\r\n\r\n")  # fmt: skip
        # the head is passed on; a body it cannot frame is not: the connection closes
        assert await asyncio.wait_for(client.reader.read(), WAIT) == framed
        status, _ = await (await connect(proxy)).ask("CONNECT 127.0.0.1:\xb2\xb3 HTTP/1.1", flow)
        assert status == 403
    await asyncio.sleep(0.05)
    assert "Unhandled exception" not in caplog.text and proxy.open_connections == 0


# -- a TLS link to an https proxy that breaks after the handshake ---------------------------


async def test_an_https_proxy_whose_tls_breaks_after_the_handshake_is_a_proxy_failure(
    tmp_path: Path, site: Origin
) -> None:
    server_tls, client_tls = self_signed(tmp_path)

    async def corrupt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # a record that is no TLS record of this session, written under the TLS layer
        raw = socket.socket(fileno=writer.get_extra_info("socket").fileno())
        raw.send(b"\x17\x03\x03\x00\x05garbage")
        raw.detach()
        await reader.read()

    async with (
        serving(LocalProxy(0), corrupt, server_tls) as broken,
        http_proxy(tls=server_tls) as working,
    ):
        proxies, failures = chained(Secrets(), local(broken, "https"), local(working, "https"))

        async def through(endpoint: ProxyEndpoint) -> int:
            reader, writer = await open_tunnel(endpoint, site.host, site.port, tls=client_tls)
            return await http_get(reader, writer, site.host)

        assert await proxies.open(through) == 200
    assert [(f.proxy_id, f.error) for f in failures] == [("p0", "protocol")]
    assert working.tunnels == [(site.host, site.port)]


# -- the last candidate dies under load; many failovers leave nothing behind ---------------


async def test_concurrent_connections_on_the_last_dying_candidate_all_fail_closed(
    proxy: EgressProxy, site: Origin
) -> None:
    async with http_proxy() as only:
        proxies, failures = chained(Secrets(), local(only, "http"))
        flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                        proxies=proxies)  # fmt: skip
        assert await connect_status(proxy, flow, site) == 200
    _, statuses = await connect_at_once(proxy, flow, site, 20)
    assert statuses == [502] * 20
    assert [f.error for f in failures] == ["unreachable"] and proxies.exhausted
    assert site.connections == 1  # the one before it died; none direct after


async def test_many_failovers_leave_no_sockets_or_tasks_behind(
    proxy: EgressProxy, site: Origin
) -> None:
    async with http_proxy(answer=502) as refusing, http_proxy() as working:
        # one refused connection first: what the proxy sets up once is not counted
        await connect_status(proxy, register(proxy, AllowedHosts([]), {}, Refusals()), site)
        await asyncio.sleep(0.05)
        fds, tasks = open_fds(), len(asyncio.all_tasks())
        for _ in range(30):  # a flow each: the first candidate refuses, the second works
            proxies, _ = chained(Secrets(), ProxyEndpoint("http", "127.0.0.1", dead_port()),
                                 local(refusing, "http"), local(working, "http"))  # fmt: skip
            flow = register(proxy, AllowedHosts(["127.0.0.1"]), ports_of(site), Refusals(),
                            proxies=proxies)  # fmt: skip
            client = await connect(proxy)
            assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
            assert await client.echo(b"x\n") == b"x\n"
            proxy.unregister(flow)
            client.writer.close()
        await asyncio.wait_for(proxy.idle(), WAIT)
        await asyncio.sleep(0.2)  # the local servers' halves close
        assert proxy.flows == 1 and proxy.open_connections == 0
        assert open_fds() <= fds and len(asyncio.all_tasks()) <= tasks
