"""How a flow's admitted connection leaves the runner: directly, or chained through the
flow's upstream proxy candidates (``agents.proxy_failover``), moving down the list when
one fails.

The way is the current candidate's (``agents.egress.route``): a host on its bypass list
is connected to directly; otherwise the upstream is handed the address the runner
resolved and checked, or, for a proxy that resolves names itself, the name, and then
only when every address the runner found for it passed the allow rule. A flow with
candidates never falls back to a direct connection for a host that is not on the
current candidate's bypass list: when every candidate has failed, ``ProxiesExhausted``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agents.egress.route import Route, route
from agents.egress.rule import IpAddress, Refusal
from agents.proxy_failover import FlowProxies
from engine.proxies.tunnel import Streams, open_tunnel
from schemas.proxies import ProxyEndpoint

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Destination:
    """A host:port the consent rule admitted, and what the runner's resolving found."""

    host: str  # normal form
    port: int
    allowed: tuple[IpAddress, ...]  # the answers the allow rule admits, the resolver's order
    refused: Refusal | None  # why the first refused answer is refused; None: none was
    address_fixed: bool  # an IP literal, or mapped by the job's DNS mode: no name to hand on


class NameRefused(Exception):
    """The name may not be handed to a proxy that resolves it: the runner found an
    address for it that the allow rule refuses."""

    def __init__(self, reason: Refusal) -> None:
        super().__init__(str(reason))
        self.reason = reason


async def open_direct(destination: Destination) -> Streams:
    """Streams to the first allowed address that answers; the last failure when none does."""
    last: OSError | TimeoutError | None = None
    for address in destination.allowed:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(str(address), destination.port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as err:
            last = err
    raise last or OSError("no address to connect to")


async def open_upstream(proxies: FlowProxies | None, destination: Destination) -> Streams:
    """Streams to ``destination`` the way the flow's connections leave.

    Raises ``OSError``/``TimeoutError`` for a direct connection that fails,
    ``ProxiesExhausted`` when no candidate is left, ``NameRefused`` when the current
    candidate resolves names and one of the name's addresses is refused."""
    if proxies is None or proxies.direct:
        return await open_direct(destination)

    async def through(upstream: ProxyEndpoint) -> Streams:
        match route(upstream, destination.host, address_fixed=destination.address_fixed):
            case Route.DIRECT:
                return await open_direct(destination)
            case Route.BY_NAME:
                if destination.refused is not None:
                    raise NameRefused(destination.refused)
                to = destination.host
            case Route.BY_ADDRESS:
                to = str(destination.allowed[0])
        return await open_tunnel(upstream, to, destination.port, timeout=CONNECT_TIMEOUT)

    return await proxies.open(through)
