"""A TCP tunnel through an upstream proxy: HTTP CONNECT (over TLS for https) or SOCKS5.

Every failure that is the proxy's is a ``ProxyError`` of a kind (unreachable, timeout,
auth, refused, protocol), its message naming the proxy by its label, never by its
credentials.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
import struct

from schemas import VERSION
from schemas.proxies import ProxyEndpoint, ProxyError

HEAD_LIMIT = 16_384
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_tunnel(
    proxy: ProxyEndpoint,
    host: str,
    port: int,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - one bound for connect and handshake together
    tls: ssl.SSLContext | None = None,
) -> Streams:
    """Streams to ``host:port`` through ``proxy``; ``ProxyError`` when the proxy fails.

    An ``https`` proxy is spoken to over TLS, its certificate verified against the
    system's trust store (or ``tls``, a context that trusts it)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(proxy, tls)
            try:
                if proxy.scheme == "socks5":
                    await _socks5(proxy, reader, writer, host, port)
                else:
                    await _http_connect(proxy, reader, writer, host, port)
            except BaseException:
                writer.transport.abort()
                raise
    except TimeoutError:
        raise ProxyError("timeout", f"{proxy.label} did not answer within {timeout:g}s") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as err:
        # OSError: a reset, or a TLS link to an https proxy that broke (ssl.SSLError)
        raise ProxyError("protocol", f"{proxy.label} broke off: {type(err).__name__}") from None
    return reader, writer


async def _connect(proxy: ProxyEndpoint, tls: ssl.SSLContext | None) -> Streams:
    if proxy.scheme != "https":
        tls = None
    elif tls is None:
        tls = ssl.create_default_context()
    try:
        return await asyncio.open_connection(
            proxy.host, proxy.port, ssl=tls, server_hostname=proxy.host if tls else None
        )
    except ssl.SSLError as err:
        raise ProxyError("protocol", f"{proxy.label}: TLS failed ({err.reason})") from None
    except OSError as err:
        raise ProxyError(
            "unreachable", f"{proxy.label} unreachable: {err.strerror or err}"
        ) from None


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _http_connect(
    proxy: ProxyEndpoint,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
) -> None:
    target = _authority(host, port)
    lines = [
        f"CONNECT {target} HTTP/1.1",
        f"Host: {target}",
        f"User-Agent: TrafficBuster/{VERSION}",
    ]
    if proxy.has_credentials:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > HEAD_LIMIT:
        raise ProxyError("protocol", f"{proxy.label}: answer head too long")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    code = parts[1] if len(parts) > 1 else ""
    # ASCII digits only: int() refuses the other characters str.isdigit() accepts ("²")
    if not parts[0].startswith("HTTP/") or not (code.isascii() and code.isdigit()):
        raise ProxyError("protocol", f"{proxy.label}: not an HTTP answer to CONNECT")
    status = int(code)
    if status == 407:
        raise ProxyError("auth", f"{proxy.label} refused the credentials (407)")
    if not 200 <= status < 300:
        # the code only: the rest of the line is the proxy's to write, and one that echoes
        # the request would put its credentials into ProxyFailed
        raise ProxyError("refused", f"{proxy.label} answered CONNECT with {status}")


async def _socks5(
    proxy: ProxyEndpoint,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
) -> None:
    method = 2 if proxy.has_credentials else 0
    writer.write(bytes([5, 1, method]))
    await writer.drain()
    version, chosen = await reader.readexactly(2)
    if version != 5:
        raise ProxyError("protocol", f"{proxy.label}: not a SOCKS5 server")
    if chosen != method:
        raise ProxyError(
            "auth" if 2 in (method, chosen) else "refused",
            f"{proxy.label}: no acceptable SOCKS5 method",
        )
    if method == 2:
        user, password = proxy.username.encode(), proxy.password.encode()
        writer.write(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        await writer.drain()
        _, status = await reader.readexactly(2)
        if status != 0:
            raise ProxyError("auth", f"{proxy.label} refused the credentials (SOCKS5)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        dest = bytes([3, len(name)]) + name
    else:
        dest = bytes([1 if address.version == 4 else 4]) + address.packed
    writer.write(bytes([5, 1, 0]) + dest + struct.pack("!H", port))
    await writer.drain()
    version, reply, _, bound = await reader.readexactly(4)
    if version != 5:
        raise ProxyError("protocol", f"{proxy.label}: not a SOCKS5 reply")
    if reply != 0:
        raise ProxyError("refused", f"{proxy.label}: SOCKS5 connect failed (reply {reply})")
    if bound == 1:
        await reader.readexactly(4 + 2)
    elif bound == 4:
        await reader.readexactly(16 + 2)
    elif bound == 3:
        (size,) = await reader.readexactly(1)
        await reader.readexactly(size + 2)
    else:
        raise ProxyError("protocol", f"{proxy.label}: SOCKS5 reply of unknown address type")
