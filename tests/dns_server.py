"""A small authoritative DNS server on loopback, for DNS verification tests.

Answers TXT questions from ``records`` (name -> strings; changeable while it runs),
NXDOMAIN for any other name; written with dnspython's message and wire functions
over asyncio UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from engine.consent.dns_txt import NameServer


@dataclass
class DnsServer:
    records: dict[str, list[str]] = field(default_factory=dict)
    questions: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> NameServer:
        return NameServer("127.0.0.1", self.port)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text(omit_final_dot=True).lower()
            self.questions.append(name)
            texts = self.records.get(name)
            if texts is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT and texts:
                quoted = [f'"{text}"' for text in texts]
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 60, "IN", "TXT", quoted)
                )
        return response.to_wire()


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self.transport is not None
        with contextlib.suppress(dns.exception.DNSException):  # malformed: no answer
            self.transport.sendto(self.server.answer(data), addr)


@contextlib.contextmanager
def dns_server(records: dict[str, list[str]] | None = None) -> Iterator[DnsServer]:
    """Serves on a loop of its own thread, so a caller that blocks its own loop (a test
    client running the app) still gets answers."""
    server = DnsServer(records=dict(records or {}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-dns", daemon=True)
    thread.start()

    async def listen() -> asyncio.DatagramTransport:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(server), local_addr=("127.0.0.1", 0)
        )
        return transport

    transport = asyncio.run_coroutine_threadsafe(listen(), loop).result(timeout=5)
    server.port = transport.get_extra_info("sockname")[1]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(transport.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
