"""The runner's egress proxy: every byte a flow's browser context sends leaves through it.

One proxy per runner on loopback; each flow registers and gets its own credentials (a
token as proxy username and password), so each connection is known to belong to one
flow. ``CONNECT`` tunnels (https, wss, and ws: Chromium tunnels those too) and plain
http requests are checked against that flow's consented host:port pairs, the name is
resolved here (or taken from the flow's host map) and every address is checked again
before connecting (``agents.egress.rule``), whichever way the connection then leaves
(``agents.egress.route``: directly, or through the flow's upstream proxy by address or,
for a proxy that resolves names, by name). No TLS interception: a tunnel carries the
browser's own TLS. A refusal answers 403 and is reported to the flow; a revoked host's
open tunnels are cut at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

from agents.egress.messages import (
    HOP_HEADERS,
    BadMessage,
    Framing,
    Head,
    copy_body,
    framing,
    parse_head,
    parse_status,
    pipe,
    respond,
    response_framing,
    skip_body,
    split_authority,
    wants_close,
)
from agents.egress.rule import (
    IpAddress,
    Refusal,
    allow_address,
    allow_destination,
    as_address,
    normal_host,
)
from agents.egress.upstream import Destination, NameRefused, open_upstream
from agents.executor import AllowedHosts
from agents.proxy_failover import FlowProxies, ProxiesExhausted
from engine.proxies.tunnel import Streams
from schemas.consent_state import DEFAULT_PORTS

log = structlog.get_logger("tb.egress")

HEAD_LIMIT = 65_536
HEAD_TIMEOUT = 30.0  # for a request head to arrive, first or next on a kept connection
REALM = 'Basic realm="trafficbuster-egress"'
REFUSAL_HEADER = "X-TrafficBuster-Egress"  # on the proxy's 403: why it refused


@dataclass(frozen=True)
class Refused:
    """One refused connection: where it wanted to go, why not, and what asked for it."""

    host: str
    port: int
    reason: Refusal
    request: str  # the request line the proxy saw, e.g. "CONNECT host:443"


class Tunnel:
    """One open connection of a flow, held so it can be cut."""

    __slots__ = ("client", "host", "remote")

    def __init__(self, host: str, client: asyncio.StreamWriter, remote: asyncio.StreamWriter):
        self.host, self.client, self.remote = host, client, remote

    def cut(self) -> None:
        self.client.transport.abort()
        self.remote.transport.abort()


@dataclass(eq=False)
class FlowEgress:
    """One flow's registration: its credentials, what it may reach and how."""

    token: str
    hosts: AllowedHosts
    ports: Mapping[str, frozenset[int]]
    host_map: Mapping[str, IpAddress]
    # the upstream proxy candidates its connections are chained through (None: direct)
    proxies: FlowProxies | None
    on_refused: Callable[[Refused], Awaitable[None]]
    label: str = ""
    tunnels: set[Tunnel] = field(default_factory=set)
    # connections still being opened (through upstreams, each may wait on several), and
    # to which host: cut too, so an ended flow or a revoked host gets no new connection
    opening: dict[asyncio.Task[None], str] = field(default_factory=dict)
    opened: int = 0  # connections admitted so far
    _unwatch: Callable[[], None] | None = None

    @property
    def username(self) -> str:
        return self.token

    @property
    def password(self) -> str:
        return self.token

    def cut(self, host: str | None = None) -> int:
        """Close the flow's open connections (to ``host`` only, when given)."""
        chosen = [t for t in self.tunnels if host is None or t.host == host]
        for tunnel in chosen:
            self.tunnels.discard(tunnel)
            tunnel.cut()
        for task, to in self.opening.items():
            if host is None or to == host:
                task.cancel()
        return len(chosen)


Resolver = Callable[[str, int], Awaitable[list[IpAddress]]]


async def system_resolve(host: str, port: int) -> list[IpAddress]:
    """The addresses the system resolver gives for ``host``, each once; none when it fails."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except OSError:
        return []
    found: list[IpAddress] = []
    for *_, sockaddr in infos:
        address = as_address(str(sockaddr[0]))
        if address is not None and address not in found:
            found.append(address)
    return found


class EgressProxy:
    """An HTTP proxy on loopback that admits each flow's consented host:port pairs only;
    ``resolve`` is how it finds a name's addresses (the system resolver)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, resolve: Resolver = system_resolve
    ) -> None:
        self.host, self.port = host, port
        self.resolve = resolve
        self._server: asyncio.Server | None = None
        self._flows: dict[str, FlowEgress] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()
        self._serial = itertools.count(1)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    @property
    def flows(self) -> int:
        return len(self._flows)

    @property
    def open_connections(self) -> int:
        return len(self._handlers)

    async def idle(self) -> None:
        """Return once no browser connection is open."""
        await self._idle.wait()

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=HEAD_LIMIT, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("egress.listening", url=self.url)

    async def close(self) -> None:
        server, self._server = self._server, None
        for flow in list(self._flows.values()):
            self.unregister(flow)
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    def register(
        self,
        hosts: AllowedHosts,
        ports: Mapping[str, frozenset[int]],
        on_refused: Callable[[Refused], Awaitable[None]],
        *,
        host_map: Mapping[str, str] | None = None,
        proxies: FlowProxies | None = None,
        label: str = "",
    ) -> FlowEgress:
        """A flow's credentials; ``hosts`` is watched: a revoked host's connections are cut.

        Raises ``ValueError`` for a host map entry that is not an IP address."""
        mapped: dict[str, IpAddress] = {}
        for name, value in (host_map or {}).items():
            address = as_address(value)
            if address is None:
                raise ValueError(f"host map: {value!r} for {name!r} is not an IP address")
            mapped[normal_host(name)] = address
        token = f"f{next(self._serial)}-{secrets.token_urlsafe(18)}"
        flow = FlowEgress(
            token=token,
            hosts=hosts,
            ports={normal_host(h): frozenset(p) for h, p in ports.items()},
            host_map=mapped,
            proxies=proxies,
            on_refused=on_refused,
            label=label,
        )
        flow._unwatch = hosts.watch(lambda host: self._revoked(flow, host))
        self._flows[token] = flow
        return flow

    def unregister(self, flow: FlowEgress) -> None:
        """The flow is over: its credentials stop working and its connections close."""
        self._flows.pop(flow.token, None)
        if flow._unwatch is not None:
            flow._unwatch()
            flow._unwatch = None
        flow.cut()

    def _revoked(self, flow: FlowEgress, host: str) -> None:
        cut = flow.cut(host)
        log.info("egress.host_revoked", flow=flow.label, host=host, connections_cut=cut)

    # -- one client connection ----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._idle.clear()
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # cut while opening (flow ended, host revoked) or the proxy closing: the
            # connection's task ends here, as the server expects its tasks to end
            pass
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            BadMessage,
        ):
            pass  # either side went away or spoke nonsense: the connection just closes
        finally:
            self._handlers.discard(task)
            if not self._handlers:
                self._idle.set()
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.IncompleteReadError:
                return  # closed between requests
            head = parse_head(raw)
            if head is None:
                await respond(writer, 400, "Bad Request", close=True)
                return
            flow = self._flow_of(head)
            if flow is None:
                # Chromium asks without credentials first and retries with them
                await skip_body(reader, head)
                await respond(
                    writer, 407, "Proxy Authentication Required", [("Proxy-Authenticate", REALM)]
                )
                continue
            handle = self._tunnel if head.method == "CONNECT" else self._forward
            await handle(flow, head, (reader, writer))
            return

    def _flow_of(self, head: Head) -> FlowEgress | None:
        credentials = head.header("proxy-authorization")
        if not credentials or credentials[:6].lower() != "basic ":
            return None
        try:
            user, _, password = (
                base64.b64decode(credentials[6:].strip(), validate=True).decode().partition(":")
            )
        except (ValueError, UnicodeDecodeError):
            return None
        flow = self._flows.get(user)
        if flow is None or not hmac.compare_digest(password.encode(), flow.password.encode()):
            return None
        return flow

    async def _tunnel(self, flow: FlowEgress, head: Head, client: Streams) -> None:
        reader, writer = client
        destination = split_authority(head.target)
        if destination is None:
            await self._refuse(flow, writer, "", 0, Refusal.REQUEST, head)
            return
        host, port = destination
        remote = await self._open(flow, host, port, head, writer)
        if remote is None:
            return
        await respond(writer, 200, "Connection Established", close=False, length=False)
        await self._relay(flow, host, reader, writer, *remote)

    async def _forward(self, flow: FlowEgress, head: Head, client: Streams) -> None:
        """Plain http: each request on the connection is checked on its own, and passed on
        over a connection to its destination that is kept while requests go there."""
        reader, writer = client
        tunnel: Tunnel | None = None
        remote: Streams | None = None
        current: tuple[str, int] | None = None
        try:
            while True:
                target = absolute_target(head.target)
                if target is None:
                    host, port = "", 0
                    await self._refuse(flow, writer, host, port, Refusal.REQUEST, head)
                    return
                host, port, path = target
                if tunnel is None or remote is None or current != (host, port):
                    if tunnel is not None:
                        flow.tunnels.discard(tunnel)
                        tunnel.remote.transport.abort()
                        tunnel = None
                    remote = await self._open(flow, host, port, head, writer)
                    if remote is None:
                        return
                    tunnel = self._track(flow, host, writer, remote[1])
                    if tunnel is None:
                        return
                    current = (host, port)
                elif host not in flow.hosts:
                    return  # revoked: the connection is being cut
                remote_reader, remote_writer = remote
                lines = [f"{head.method} {path} {head.version}"]
                lines += [f"{k}: {v}" for k, v in head.headers if k.lower() not in HOP_HEADERS]
                remote_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                await copy_body(reader, remote_writer, framing(head.headers, response=False))
                status = parse_status(await remote_reader.readuntil(b"\r\n\r\n"))
                if status is None:
                    await respond(writer, 502, "Bad Gateway", close=True)
                    return
                writer.write(status.raw)
                how = response_framing(head.method, status)
                await copy_body(remote_reader, writer, how)
                if how[0] is Framing.UNTIL_CLOSE or wants_close(status.headers):
                    return
                if wants_close(head.headers, head.version):
                    return
                next_head = await self._next_request(flow, reader, writer)
                if next_head is None:
                    return
                head = next_head
        finally:
            if tunnel is not None:
                flow.tunnels.discard(tunnel)
                tunnel.remote.transport.abort()

    async def _next_request(
        self, flow: FlowEgress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Head | None:
        """The connection's next plain request, when it comes from the same flow."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.IncompleteReadError:
            return None  # the browser closed the idle connection
        head = parse_head(raw)
        if head is None or head.method == "CONNECT":
            await respond(writer, 400, "Bad Request", close=True)
            return None
        # the connection was authenticated with its first request; credentials sent again
        # must be the same flow's
        if head.header("proxy-authorization") is not None and self._flow_of(head) is not flow:
            await respond(writer, 407, "Proxy Authentication Required", close=True)
            return None
        return head

    async def _open(
        self, flow: FlowEgress, host: str, port: int, head: Head, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        host = normal_host(host)
        hosts = flow.hosts.current
        refusal = allow_destination(host, port, hosts, flow.ports)
        if refusal is not None:
            await self._refuse(flow, writer, host, port, refusal, head)
            return None
        addresses = await self._resolve(flow, host, port)
        if not addresses:
            await self._refuse(flow, writer, host, port, Refusal.UNRESOLVED, head)
            return None
        verdicts = [allow_address(a, port, hosts, flow.ports) for a in addresses]
        allowed = tuple(a for a, verdict in zip(addresses, verdicts, strict=True) if not verdict)
        refused = next((verdict for verdict in verdicts if verdict), None)
        if not allowed:
            await self._refuse(flow, writer, host, port, refused or Refusal.PRIVATE, head)
            return None
        fixed = host in flow.host_map or as_address(host) is not None
        destination = Destination(host, port, allowed, refused, address_fixed=fixed)
        task = asyncio.current_task()
        assert task is not None
        flow.opening[task] = host
        try:
            return await open_upstream(flow.proxies, destination)
        except ProxiesExhausted:
            log.info("egress.proxies_exhausted", flow=flow.label, host=host, port=port)
        except NameRefused as err:
            await self._refuse(flow, writer, host, port, err.reason, head)
            return None
        except (OSError, TimeoutError) as err:
            log.debug(
                "egress.connect_failed", flow=flow.label, host=host, port=port, error=repr(err)
            )
        finally:
            flow.opening.pop(task, None)
        await respond(writer, 502, "Bad Gateway", close=True)
        return None

    async def _resolve(self, flow: FlowEgress, host: str, port: int) -> list[IpAddress]:
        if (mapped := flow.host_map.get(host)) is not None:
            return [mapped]
        if (literal := as_address(host)) is not None:
            return [literal]
        return await self.resolve(host, port)

    async def _refuse(
        self,
        flow: FlowEgress,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        reason: Refusal,
        head: Head,
    ) -> None:
        refused = Refused(host=host, port=port, reason=reason, request=head.line)
        log.debug(
            "egress.refused",
            flow=flow.label,
            host=host,
            port=port,
            reason=str(reason),
            request=head.line,
        )
        await respond(
            writer,
            403,
            "Forbidden",
            [(REFUSAL_HEADER, str(reason))],
            close=True,
            # a page with a body is shown (and its headers read) rather than a network error
            body=f"refused by the TrafficBuster egress proxy: {reason}\n".encode(),
        )
        try:
            await flow.on_refused(refused)
        except Exception as err:  # the refusal stands whatever becomes of its report
            log.warning("egress.report_failed", flow=flow.label, error=repr(err))

    def _track(
        self,
        flow: FlowEgress,
        host: str,
        client: asyncio.StreamWriter,
        remote: asyncio.StreamWriter,
    ) -> Tunnel | None:
        """Hold a new connection of the flow so it can be cut; None (and closed) when the
        flow ended or the host was revoked while it was being opened."""
        tunnel = Tunnel(host, client, remote)
        if flow.token not in self._flows or host not in flow.hosts:
            tunnel.cut()
            return None
        flow.tunnels.add(tunnel)
        flow.opened += 1
        return tunnel

    async def _relay(
        self,
        flow: FlowEgress,
        host: str,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        remote_reader: asyncio.StreamReader,
        remote_writer: asyncio.StreamWriter,
    ) -> None:
        tunnel = self._track(flow, host, client_writer, remote_writer)
        if tunnel is None:
            return
        try:
            await asyncio.gather(
                pipe(client_reader, remote_writer), pipe(remote_reader, client_writer)
            )
        finally:
            flow.tunnels.discard(tunnel)
            tunnel.cut()


def absolute_target(target: str) -> tuple[str, int, str] | None:
    """Host, port and origin-form path of a plain request's absolute http URL."""
    try:
        parts = urlsplit(target)
        host, port = parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return None
    if parts.scheme != "http" or not host:
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return normal_host(host), port, path
