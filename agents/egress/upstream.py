"""Chaining to a flow's upstream proxy: an HTTP CONNECT or a SOCKS5 tunnel to one address.

The egress proxy hands the upstream the address it resolved and checked, never the
name, so the upstream cannot send the bytes anywhere the allow rule did not see.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Literal

from agents.egress.rule import IpAddress

CONNECT_TIMEOUT = 10.0
HEAD_LIMIT = 16_384

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UpstreamFailed(Exception):
    """The upstream proxy could not be reached or would not open the tunnel."""


@dataclass(frozen=True)
class Upstream:
    """A flow's upstream proxy; the password stays in memory, never in events or logs."""

    scheme: Literal["http", "socks5"]
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    @property
    def label(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


async def open_direct(address: IpAddress, port: int) -> Streams:
    return await asyncio.wait_for(asyncio.open_connection(str(address), port), CONNECT_TIMEOUT)


async def open_through(upstream: Upstream, address: IpAddress, port: int) -> Streams:
    """A tunnel to ``address:port`` through ``upstream``; raises ``UpstreamFailed``."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(upstream.host, upstream.port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError) as err:
        raise UpstreamFailed(f"{upstream.label} unreachable: {err!r}") from err
    handshake = _http_connect if upstream.scheme == "http" else _socks5_connect
    try:
        await asyncio.wait_for(
            handshake(upstream, (reader, writer), address, port), CONNECT_TIMEOUT
        )
    except UpstreamFailed:
        writer.transport.abort()
        raise
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
        writer.transport.abort()
        raise UpstreamFailed(f"{upstream.label}: {err!r}") from err
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


def authority(address: IpAddress, port: int) -> str:
    host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    return f"{host}:{port}"


async def _http_connect(upstream: Upstream, remote: Streams, address: IpAddress, port: int) -> None:
    reader, writer = remote
    target = authority(address, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if upstream.username or upstream.password:
        secret = base64.b64encode(f"{upstream.username}:{upstream.password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {secret}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > HEAD_LIMIT:
        raise UpstreamFailed(f"{upstream.label}: answer too long")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].startswith("2"):
        raise UpstreamFailed(f"{upstream.label} answered {status_line!r}")


async def _socks5_connect(
    upstream: Upstream, remote: Streams, address: IpAddress, port: int
) -> None:
    reader, writer = remote
    with_password = bool(upstream.username or upstream.password)
    writer.write(b"\x05\x01\x02" if with_password else b"\x05\x01\x00")
    await writer.drain()
    version, method = await reader.readexactly(2)
    if version != 5 or method != (2 if with_password else 0):
        raise UpstreamFailed(f"{upstream.label}: no acceptable SOCKS5 method ({method})")
    if with_password:
        user, password = upstream.username.encode(), upstream.password.encode()
        if len(user) > 255 or len(password) > 255:
            raise UpstreamFailed(f"{upstream.label}: SOCKS5 credentials too long")
        writer.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        await writer.drain()
        _, status = await reader.readexactly(2)
        if status != 0:
            raise UpstreamFailed(f"{upstream.label}: SOCKS5 authentication failed")
    kind = b"\x01" if isinstance(address, ipaddress.IPv4Address) else b"\x04"
    writer.write(b"\x05\x01\x00" + kind + address.packed + struct.pack("!H", port))
    await writer.drain()
    _, reply, _, bound_kind = await reader.readexactly(4)
    if reply != 0:
        raise UpstreamFailed(f"{upstream.label}: SOCKS5 connect failed (reply {reply})")
    if bound_kind == 1:
        await reader.readexactly(4 + 2)
    elif bound_kind == 4:
        await reader.readexactly(16 + 2)
    elif bound_kind == 3:
        (size,) = await reader.readexactly(1)
        await reader.readexactly(size + 2)
    else:
        raise UpstreamFailed(f"{upstream.label}: SOCKS5 reply of unknown address type")
