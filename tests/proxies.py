"""Local upstream proxies for tests, on loopback: an HTTP CONNECT proxy (optionally with
Basic credentials), a SOCKS5 proxy with username and password, one that answers every
CONNECT with 502, an HTTPS one (TLS to the proxy), and a port where nothing listens.
Each records where it was asked to connect (a name or an address, as it was handed) and
may resolve names through a table of its own (``names``), as a proxy with its own DNS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from schemas.proxies import ProxyEndpoint
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class LocalProxy:
    port: int
    host: str = "127.0.0.1"
    connections: int = 0  # TCP connections accepted
    tunnels: list[tuple[str, int]] = field(default_factory=list)  # opened to these

    def url(self, scheme: str, credentials: str = "") -> str:
        return f"{scheme}://{credentials + '@' if credentials else ''}{self.host}:{self.port}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


async def _splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    host: str,
    port: int,
    names: dict[str, str] | None = None,
) -> bool:
    try:
        reader, writer = await asyncio.open_connection((names or {}).get(host, host), port)
    except OSError:
        return False

    async def both() -> None:
        await asyncio.gather(_pipe(client[0], writer), _pipe(reader, client[1]))

    asyncio.get_running_loop().create_task(both())
    return True


@contextlib.asynccontextmanager
async def serving(
    proxy: LocalProxy, handle: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[LocalProxy]:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy.connections += 1
        try:
            await handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.transport.abort()

    server = await asyncio.start_server(on_client, proxy.host, proxy.port, ssl=tls)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await server.wait_closed()


def http_proxy(
    credentials: tuple[str, str] | None = None,
    *,
    answer: int = 200,
    port: int = 0,
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    names: dict[str, str] | None = None,
) -> contextlib.AbstractAsyncContextManager[LocalProxy]:
    """An HTTP CONNECT proxy (over TLS with ``tls``: an https proxy); ``answer`` other than
    200 refuses every tunnel with it."""
    proxy = LocalProxy(port, host)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request, *lines = head.split("\r\n")
        method, target, _ = request.split(" ", 2)
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        if method != "CONNECT":
            status = 405
        elif credentials is not None and headers.get("proxy-authorization") != "Basic " + (
            base64.b64encode(":".join(credentials).encode()).decode()
        ):
            status = 407
        else:
            status = answer
        if status == 200:
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
            if await _splice((reader, writer), host, int(port_text), names):
                proxy.tunnels.append((host, int(port_text)))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                return
            status = 502
        reason = {405: "Method Not Allowed", 407: "Proxy Authentication Required"}
        writer.write(f"HTTP/1.1 {status} {reason.get(status, 'Bad Gateway')}\r\n".encode())
        writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return serving(proxy, handle, tls)


def socks5_proxy(
    username: str, password: str, *, port: int = 0, names: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[LocalProxy]:
    """A SOCKS5 proxy that takes only username/password authentication (RFC 1929)."""
    proxy = LocalProxy(port)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        if version != 5 or 2 not in methods:
            writer.write(b"\x05\xff")
            await writer.drain()
            writer.close()
            return
        writer.write(b"\x05\x02")
        _, size = await reader.readexactly(2)
        user = (await reader.readexactly(size)).decode()
        (size,) = await reader.readexactly(1)
        secret = (await reader.readexactly(size)).decode()
        if (user, secret) != (username, password):
            writer.write(b"\x01\x01")
            await writer.drain()
            writer.close()
            return
        writer.write(b"\x01\x00")
        _, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            (size,) = await reader.readexactly(1)
            host = (await reader.readexactly(size)).decode()
        (port_number,) = struct.unpack("!H", await reader.readexactly(2))
        if command != 1 or not await _splice((reader, writer), host, port_number, names):
            writer.write(b"\x05\x05\x00\x01" + bytes(6))
            await writer.drain()
            writer.close()
            return
        proxy.tunnels.append((host, port_number))
        writer.write(b"\x05\x00\x00\x01" + bytes(4) + struct.pack("!H", 0))

    return serving(proxy, handle)


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for ``host`` made here: the server's context, and a client's that
    trusts it (and nothing else)."""
    cert, key = directory / "proxy.crt", directory / "proxy.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


class Secrets(dict[str, ProxyEndpoint]):
    """Proxy endpoints by id, as a runner's secrets cache gives them (a ``SecretSource``)."""

    async def get(self, proxy_id: str) -> ProxyEndpoint | None:  # type: ignore[override]
        return dict.get(self, proxy_id)


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> int:
    """Send ``GET /`` over an open tunnel and return the answer's status code."""
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])
