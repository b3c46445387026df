"""How a flow's admitted connection leaves the runner: directly, or chained through the
flow's upstream proxy candidates (``agents.proxy_failover``), moving down the list when
one fails.

The egress proxy hands the upstream the address it resolved and checked, never the
name, so the upstream cannot send the bytes anywhere the allow rule did not see. A flow
with candidates never falls back to a direct connection: when every candidate has
failed, ``ProxiesExhausted``.
"""

from __future__ import annotations

import asyncio

from agents.egress.rule import IpAddress
from agents.proxy_failover import FlowProxies
from engine.proxies.tunnel import Streams, open_tunnel
from schemas.proxies import ProxyEndpoint

CONNECT_TIMEOUT = 10.0


async def open_direct(address: IpAddress, port: int) -> Streams:
    return await asyncio.wait_for(asyncio.open_connection(str(address), port), CONNECT_TIMEOUT)


async def open_upstream(proxies: FlowProxies | None, address: IpAddress, port: int) -> Streams:
    """Streams to ``address:port`` the way the flow's connections leave.

    Raises ``OSError``/``TimeoutError`` for a direct connection that fails (the next
    address may do), ``ProxiesExhausted`` when no candidate is left."""
    if proxies is None or proxies.direct:
        return await open_direct(address, port)

    async def through(endpoint: ProxyEndpoint) -> Streams:
        return await open_tunnel(endpoint, str(address), port, timeout=CONNECT_TIMEOUT)

    return await proxies.open(through)
