"""The egress proxy on loopback, spoken to over real sockets (no browser here).

127.0.0.1 plays the consented host; 127.0.0.2 an unauthorised one that must never
see a connection. Upstream proxies (HTTP CONNECT and SOCKS5, with passwords) are
small servers of the test's own on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from agents.egress.proxy import EgressProxy, FlowEgress, Refused
from agents.egress.rule import Refusal
from agents.executor import AllowedHosts
from agents.proxy_failover import FlowProxies, ProxyFailure
from schemas.proxies import ProxyEndpoint, ProxyScheme
from tests.proxies import LocalProxy, Secrets, dead_port, http_proxy, socks5_proxy

pytestmark = pytest.mark.timeout(30)
WAIT = 5.0

# -- servers of the test's own -------------------------------------------------------


@dataclass
class Origin:
    """A TCP server that records connections and echoes what it gets; a line starting
    with GET is answered as HTTP and the request head kept."""

    host: str
    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    async def start(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            first = await reader.readline()
            if first.split(b" ")[0] in (b"GET", b"POST", b"HEAD"):
                await self._http(first, reader, writer)
            else:
                data = first
                while data:
                    writer.write(data)
                    await writer.drain()
                    data = await reader.read(1024)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def _http(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests while the connection is kept: /chunked echoes a chunked body,
        /stream answers until it closes, /empty is a 204, anything else says hello."""
        while first:
            head = first + await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            path = head.split(b" ")[1]
            if path == b"/chunked":
                body = b""
                while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
                    body += (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            elif path == b"/stream":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nstreamed until close")
                await writer.drain()
                return
            elif path == b"/empty":
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()
            first = await reader.readline()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


# -- a client speaking to the proxy ---------------------------------------------------


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def ask(self, line: str, flow: FlowEgress | None, *headers: str) -> tuple[int, str]:
        lines = [line, *headers]
        if flow is not None:
            secret = base64.b64encode(f"{flow.username}:{flow.password}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {secret}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)).decode()
        return int(head.split(" ")[1]), head

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await asyncio.wait_for(self.reader.readexactly(len(data)), WAIT)


@pytest.fixture
async def proxy() -> AsyncIterator[EgressProxy]:
    p = EgressProxy()
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def site() -> AsyncIterator[Origin]:
    origin = await Origin("127.0.0.1").start()
    yield origin
    await origin.stop()


@pytest.fixture
async def evil() -> AsyncIterator[Origin]:
    origin = await Origin("127.0.0.2").start()
    yield origin
    await origin.stop()


async def connect(proxy: EgressProxy) -> Client:
    return Client(*await asyncio.open_connection(proxy.host, proxy.port))


@dataclass
class Refusals:
    seen: list[Refused] = field(default_factory=list)

    async def __call__(self, refused: Refused) -> None:
        self.seen.append(refused)


def register(
    proxy: EgressProxy,
    hosts: AllowedHosts,
    ports: dict[str, frozenset[int]],
    refusals: Refusals,
    **kwargs: object,
) -> FlowEgress:
    return proxy.register(hosts, ports, refusals, **kwargs)  # type: ignore[arg-type]


# -- credentials ---------------------------------------------------------------------


async def test_a_connection_without_flow_credentials_is_asked_for_them(
    proxy: EgressProxy, site: Origin
) -> None:
    flow = register(
        proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals()
    )
    client = await connect(proxy)

    status, head = await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", None)
    assert status == 407 and "Proxy-Authenticate: Basic" in head
    # the same connection goes on with the flow's credentials, as Chromium does
    status, _ = await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow)
    assert status == 200
    assert await client.echo(b"ping\n") == b"ping\n"

    proxy.unregister(flow)  # the flow is over: its credentials stop working
    status, _ = await (await connect(proxy)).ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow)
    assert status == 407


# -- refusals ------------------------------------------------------------------------


async def test_unconsented_hosts_and_ports_are_refused_and_reported(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    refusals = Refusals()
    flow = register(
        proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, refusals
    )

    asks = [
        f"CONNECT 127.0.0.2:{evil.port} HTTP/1.1",
        f"GET http://127.0.0.2:{evil.port}/beacon HTTP/1.1",
        f"CONNECT 127.0.0.1:{evil.port} HTTP/1.1",
        "CONNECT nonsense HTTP/1.1",
        "GET https://127.0.0.1/ HTTP/1.1",
    ]
    for line in asks:
        status, head = await (await connect(proxy)).ask(line, flow)
        assert status == 403, line
        assert "X-TrafficBuster-Egress:" in head

    assert [(r.host, r.port, r.reason) for r in refusals.seen] == [
        ("127.0.0.2", evil.port, Refusal.HOST),
        ("127.0.0.2", evil.port, Refusal.HOST),
        ("127.0.0.1", evil.port, Refusal.PORT),
        ("", 0, Refusal.REQUEST),
        ("", 0, Refusal.REQUEST),  # https is never a plain request: the line says what it was
    ]
    assert refusals.seen[1].request == f"GET http://127.0.0.2:{evil.port}/beacon"
    assert evil.connections == 0


async def test_names_resolving_to_private_addresses_are_refused_unless_that_address_is_consented(
    proxy: EgressProxy, site: Origin
) -> None:
    refusals = Refusals()
    port = frozenset({site.port})
    # "localhost" is consented as a name: it resolves (system DNS) to a loopback address
    # the consent does not name
    flow = register(proxy, AllowedHosts(["localhost"]), {"localhost": port}, refusals)
    status, _ = await (await connect(proxy)).ask(f"CONNECT localhost:{site.port} HTTP/1.1", flow)
    assert status == 403
    assert refusals.seen[-1].reason is Refusal.LOOPBACK

    unresolvable = register(
        proxy, AllowedHosts(["nowhere.invalid"]), {"nowhere.invalid": port}, refusals
    )
    line = f"CONNECT nowhere.invalid:{site.port} HTTP/1.1"
    status, _ = await (await connect(proxy)).ask(line, unresolvable)
    assert status == 403
    assert refusals.seen[-1].reason is Refusal.UNRESOLVED
    assert site.connections == 0


async def test_the_host_map_is_resolution_and_the_mapped_address_is_checked(
    proxy: EgressProxy, site: Origin
) -> None:
    refusals = Refusals()
    port = frozenset({site.port})
    line = f"CONNECT shop.test:{site.port} HTTP/1.1"

    mapped_to_loopback = register(
        proxy, AllowedHosts(["shop.test"]), {"shop.test": port}, refusals,
        host_map={"shop.test": "127.0.0.1"},
    )  # fmt: skip
    status, _ = await (await connect(proxy)).ask(line, mapped_to_loopback)
    assert (status, refusals.seen[-1].reason) == (403, Refusal.LOOPBACK)

    metadata = register(
        proxy, AllowedHosts(["shop.test"]), {"shop.test": port}, refusals,
        host_map={"shop.test": "169.254.169.254"},
    )  # fmt: skip
    status, _ = await (await connect(proxy)).ask(line, metadata)
    assert (status, refusals.seen[-1].reason) == (403, Refusal.METADATA)
    assert site.connections == 0

    # the operator consented the loopback address itself: the map may point there
    consented = register(
        proxy, AllowedHosts(["shop.test", "127.0.0.1"]), {"shop.test": port, "127.0.0.1": port},
        refusals, host_map={"shop.test": "127.0.0.1"},
    )  # fmt: skip
    client = await connect(proxy)
    status, _ = await client.ask(line, consented)
    assert status == 200
    assert await client.echo(b"mapped\n") == b"mapped\n"
    assert site.connections == 1

    with pytest.raises(ValueError, match="not an IP address"):
        register(proxy, AllowedHosts(["a.test"]), {}, refusals, host_map={"a.test": "b.test"})


# -- plain http ------------------------------------------------------------------------


async def test_plain_requests_are_forwarded_without_the_proxy_credentials(
    proxy: EgressProxy, site: Origin
) -> None:
    flow = register(
        proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals()
    )
    client = await connect(proxy)

    status, _ = await client.ask(
        f"GET http://127.0.0.1:{site.port}/page?x=1 HTTP/1.1", flow,
        f"Host: 127.0.0.1:{site.port}", "X-TrafficBuster: job-1", "Proxy-Connection: keep-alive",
    )  # fmt: skip

    assert status == 200
    assert await asyncio.wait_for(client.reader.readexactly(5), WAIT) == b"hello"
    (head,) = site.heads
    assert head.startswith(b"GET /page?x=1 HTTP/1.1\r\n")
    assert b"X-TrafficBuster: job-1" in head
    assert b"Proxy-" not in head


async def test_a_kept_connection_checks_each_request_and_frames_each_body(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    refusals = Refusals()
    flow = register(
        proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, refusals
    )
    client = await connect(proxy)
    base = f"http://127.0.0.1:{site.port}"

    assert (await client.ask(f"GET {base}/one HTTP/1.1", flow, "Host: a"))[0] == 200
    assert await asyncio.wait_for(client.reader.readexactly(5), WAIT) == b"hello"
    status, head = await client.ask(f"HEAD {base}/two HTTP/1.1", None, "Host: a")
    assert status == 200 and "Content-Length: 5" in head  # and no body follows a HEAD
    assert (await client.ask(f"GET {base}/empty HTTP/1.1", flow, "Host: a"))[0] == 204
    chunked = "Transfer-Encoding: chunked"
    client.writer.write(
        f"POST {base}/chunked HTTP/1.1\r\nHost: a\r\n{chunked}\r\n\r\n".encode()
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    head = (await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)).decode()
    assert head.startswith("HTTP/1.1 200") and chunked in head
    body = await asyncio.wait_for(client.reader.readuntil(b"0\r\n\r\n"), WAIT)
    assert body == b"5\r\nabcde\r\n0\r\n\r\n"
    assert site.connections == 1  # four requests, one connection to the site

    # the next request on the same connection goes elsewhere: refused, connection closed
    status, _ = await client.ask(f"GET http://127.0.0.2:{evil.port}/ HTTP/1.1", flow, "Host: b")
    assert status == 403
    rest = await asyncio.wait_for(client.reader.read(), WAIT)  # then the proxy closes
    assert rest == b"refused by the TrafficBuster egress proxy: host not consented\n"
    assert evil.connections == 0 and refusals.seen[-1].host == "127.0.0.2"

    # a body that ends when the site closes the connection ends the browser's too
    streaming = await connect(proxy)
    assert (await streaming.ask(f"GET {base}/stream HTTP/1.1", flow, "Host: a"))[0] == 200
    assert await asyncio.wait_for(streaming.reader.read(), WAIT) == b"streamed until close"


# -- revocation ------------------------------------------------------------------------


async def test_revocation_cuts_the_hosts_open_tunnels_at_once(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    hosts = AllowedHosts(["127.0.0.1", "127.0.0.2"])
    ports = {"127.0.0.1": frozenset({site.port}), "127.0.0.2": frozenset({evil.port})}
    flow = register(proxy, hosts, ports, Refusals())
    kept, cut = await connect(proxy), await connect(proxy)
    assert (await kept.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
    assert (await cut.ask(f"CONNECT 127.0.0.2:{evil.port} HTTP/1.1", flow))[0] == 200
    assert await cut.echo(b"before\n") == b"before\n"

    hosts.revoke("127.0.0.2")

    assert await asyncio.wait_for(cut.reader.read(), WAIT) == b""  # closed by the proxy
    await asyncio.wait_for(evil.closed.wait(), WAIT)
    assert await kept.echo(b"still\n") == b"still\n"
    status, _ = await (await connect(proxy)).ask(f"CONNECT 127.0.0.2:{evil.port} HTTP/1.1", flow)
    assert status == 403


async def test_unregistering_a_flow_closes_every_connection_it_has(
    proxy: EgressProxy, site: Origin
) -> None:
    flow = register(
        proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals()
    )
    clients = [await connect(proxy) for _ in range(3)]
    for client in clients:
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200

    proxy.unregister(flow)

    for client in clients:
        assert await asyncio.wait_for(client.reader.read(), WAIT) == b""
    assert proxy.flows == 0


# -- upstream proxies ------------------------------------------------------------------


class Failures(list[ProxyFailure]):
    async def __call__(self, failure: ProxyFailure) -> None:
        self.append(failure)


def chained(secrets: Secrets, *endpoints: ProxyEndpoint) -> tuple[FlowProxies, Failures]:
    """A flow whose connections go through ``endpoints`` in order, failures kept."""
    ids = []
    for endpoint in endpoints:
        ids.append(f"p{len(secrets)}")
        secrets[ids[-1]] = endpoint
    failures = Failures()
    return FlowProxies(ids, secrets, failures), failures


def local(
    proxy: LocalProxy, scheme: ProxyScheme, user: str = "", password: str = ""
) -> ProxyEndpoint:
    return ProxyEndpoint(scheme, proxy.host, proxy.port, user, password)


async def test_a_flow_is_chained_to_its_http_upstream_with_the_checked_address(
    proxy: EgressProxy, site: Origin, evil: Origin
) -> None:
    secrets = Secrets()
    async with http_proxy(("user", "s3cret")) as upstream:
        proxies, failures = chained(secrets, local(upstream, "http", "user", "s3cret"))
        flow = register(
            proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals(),
            proxies=proxies,
        )  # fmt: skip
        client = await connect(proxy)
        assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
        assert await client.echo(b"via upstream\n") == b"via upstream\n"
        assert upstream.tunnels == [("127.0.0.1", site.port)]

        # refused before the upstream is asked
        status, _ = await (await connect(proxy)).ask(
            f"CONNECT 127.0.0.2:{evil.port} HTTP/1.1", flow
        )
        assert status == 403
        assert upstream.tunnels == [("127.0.0.1", site.port)] and evil.connections == 0

        wrong, wrong_failures = chained(secrets, local(upstream, "http", "user", "wrong"))
        denied = register(
            proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals(),
            proxies=wrong,
        )  # fmt: skip
        status, _ = await (await connect(proxy)).ask(
            f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", denied
        )
        assert status == 502  # never a direct connection instead
        assert site.connections == 1
    assert not failures and [f.error for f in wrong_failures] == ["auth"]
    assert wrong.exhausted and "s3cret" not in repr(secrets)


async def test_a_flow_is_chained_to_its_socks5_upstream_with_a_password(
    proxy: EgressProxy, site: Origin
) -> None:
    secrets = Secrets()
    async with socks5_proxy("sock", "pw") as upstream:
        proxies, _ = chained(secrets, local(upstream, "socks5", "sock", "pw"))
        flow = register(
            proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals(),
            proxies=proxies,
        )  # fmt: skip
        client = await connect(proxy)
        status, _ = await client.ask(
            f"GET http://127.0.0.1:{site.port}/s HTTP/1.1", flow, "Host: x"
        )
        assert status == 200
        assert await asyncio.wait_for(client.reader.readexactly(5), WAIT) == b"hello"
        assert upstream.tunnels == [("127.0.0.1", site.port)]

        denied, failures = chained(secrets, local(upstream, "socks5", "sock", "nope"))
        flow = register(
            proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals(),
            proxies=denied,
        )  # fmt: skip
        status, _ = await (await connect(proxy)).ask(
            f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow
        )
        assert status == 502
        assert len(upstream.tunnels) == 1 and [f.error for f in failures] == ["auth"]


async def test_failed_upstreams_hand_over_to_the_next_candidate_within_the_connection(
    proxy: EgressProxy, site: Origin
) -> None:
    secrets = Secrets()
    async with http_proxy(answer=502) as gateway, http_proxy(("user", "pw")) as working:
        dead = ProxyEndpoint("http", "127.0.0.1", dead_port())
        proxies, failures = chained(
            secrets, dead, local(gateway, "http"), local(working, "http", "user", "pw")
        )
        flow = register(
            proxy, AllowedHosts(["127.0.0.1"]), {"127.0.0.1": frozenset({site.port})}, Refusals(),
            proxies=proxies,
        )  # fmt: skip
        for _ in range(2):  # the second connection goes straight to the one that works
            client = await connect(proxy)
            assert (await client.ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow))[0] == 200
            assert await client.echo(b"failover\n") == b"failover\n"
        assert [(f.proxy, f.error) for f in failures] == [
            (dead.label, "unreachable"),
            (local(gateway, "http").label, "refused"),
        ]
        assert proxies.current_id == "p2" and len(working.tunnels) == 2
    # the one in use went away and no candidate is left: the connection fails, never
    # a direct one instead
    status, _ = await (await connect(proxy)).ask(f"CONNECT 127.0.0.1:{site.port} HTTP/1.1", flow)
    assert status == 502 and proxies.exhausted
    assert [f.error for f in failures][-1] == "unreachable"
    assert site.connections == 2
