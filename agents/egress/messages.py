"""HTTP/1.1 as the egress proxy speaks it: request and response heads, and message bodies
copied by their framing (length, chunked, or until the connection closes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum

from agents.egress.rule import normal_host

CHUNK = 65_536
# connection-level headers, never passed on (RFC 9110 7.6.1), and the proxy's own
HOP_HEADERS = frozenset(
    {
        "proxy-authorization",
        "proxy-connection",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    }
)


class BadMessage(Exception):
    """A message the proxy cannot frame: the connection is closed."""


@dataclass(frozen=True)
class Head:
    """A request head: ``method target version`` and the header lines."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    @property
    def line(self) -> str:
        return f"{self.method} {self.target}"[:500]


@dataclass(frozen=True)
class Status:
    """A response head as received, kept raw to be passed on unchanged."""

    code: int
    headers: list[tuple[str, str]]
    raw: bytes


def is_number(text: str) -> bool:
    """ASCII digits only: ``int()`` refuses the others ``str.isdigit()`` accepts ("²")."""
    return text.isascii() and text.isdigit()


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


def wants_close(headers: list[tuple[str, str]], version: str = "HTTP/1.1") -> bool:
    tokens = {t.strip().lower() for t in (header(headers, "connection") or "").split(",")}
    return "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)


def _header_lines(lines: list[str]) -> list[tuple[str, str]] | None:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name, value.strip()))
    return headers


def parse_head(raw: bytes) -> Head | None:
    lines = raw.decode("latin-1").split("\r\n")
    request = lines[0].split(" ")
    if len(request) != 3 or not request[2].startswith("HTTP/1."):
        return None
    headers = _header_lines(lines[1:])
    if headers is None:
        return None
    return Head(method=request[0].upper(), target=request[1], version=request[2], headers=headers)


def parse_status(raw: bytes) -> Status | None:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not is_number(parts[1]):
        return None
    headers = _header_lines(lines[1:])
    if headers is None:
        return None
    return Status(code=int(parts[1]), headers=headers, raw=raw)


def split_authority(target: str) -> tuple[str, int] | None:
    """``host:port`` of a CONNECT request (IPv6 literals in brackets)."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not is_number(port_text):
        return None
    port = int(port_text)
    if not 0 < port < 65536:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    return normal_host(host), port


class Framing(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until close"


def framing(headers: list[tuple[str, str]], *, response: bool) -> tuple[Framing, int]:
    """How a message's body ends (RFC 9112 6.3); raises ``BadMessage`` when unclear."""
    encoding = header(headers, "transfer-encoding")
    if encoding is not None:
        if encoding.split(",")[-1].strip().lower() != "chunked":
            if response:
                return Framing.UNTIL_CLOSE, 0
            raise BadMessage("request body without chunked framing")
        return Framing.CHUNKED, 0
    lengths = {v.strip() for k, v in headers if k.lower() == "content-length"}
    if len(lengths) > 1:
        raise BadMessage("conflicting Content-Length")
    if lengths:
        (length,) = lengths
        if not is_number(length):
            raise BadMessage("bad Content-Length")
        return (Framing.LENGTH, int(length)) if int(length) else (Framing.NONE, 0)
    return (Framing.UNTIL_CLOSE, 0) if response else (Framing.NONE, 0)


def response_framing(method: str, status: Status) -> tuple[Framing, int]:
    if method == "HEAD" or status.code < 200 or status.code in (204, 304):
        return Framing.NONE, 0
    return framing(status.headers, response=True)


async def copy_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, how: tuple[Framing, int]
) -> None:
    kind, length = how
    if kind is Framing.LENGTH:
        await _copy_exactly(reader, writer, length)
    elif kind is Framing.CHUNKED:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as err:
                raise BadMessage("bad chunk size") from err
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    writer.write(trailer)
                writer.write(b"\r\n")
                break
            await _copy_exactly(reader, writer, size + 2)  # the chunk and its CRLF
    elif kind is Framing.UNTIL_CLOSE:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    await writer.drain()


async def _copy_exactly(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int
) -> None:
    while length > 0:
        data = await reader.read(min(length, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", length)
        writer.write(data)
        length -= len(data)
        await writer.drain()


async def skip_body(reader: asyncio.StreamReader, head: Head) -> None:
    """Read past a request's body the proxy will not pass on."""
    kind, length = framing(head.headers, response=False)
    if kind is Framing.LENGTH:
        await reader.readexactly(length)
    elif kind is Framing.CHUNKED:
        raise BadMessage("chunked body of a request the proxy answers itself")


async def respond(
    writer: asyncio.StreamWriter,
    status: int,
    text: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    close: bool = False,
    length: bool = True,
    body: bytes = b"",
) -> None:
    lines = [f"HTTP/1.1 {status} {text}", *(f"{k}: {v}" for k, v in headers or [])]
    if body:
        lines.append("Content-Type: text/plain; charset=utf-8")
    if length:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction of a tunnel until it ends."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        writer.transport.abort()
