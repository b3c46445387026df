"""Which way one admitted connection leaves the runner, given the flow's current upstream.

Pure: no I/O. The consent rule has admitted the host:port before a route is chosen, and
every route connects only where the runner's own check of the name's addresses allows,
so a bypass list never widens what a flow may reach and DNS by the proxy never takes a
flow to an address the runner refuses:

- no upstream, or the host on the current proxy's bypass list: directly, to an address
  the runner resolved and checked;
- through the proxy by address (DNS ``local``, the default): the proxy is handed the
  address the runner resolved and checked, never the name;
- through the proxy by name (DNS ``proxy``): the proxy resolves the name. The runner
  still resolves it first and hands the name on only when every answer passes the allow
  rule: one loopback, private, link-local or metadata answer (not consented as that
  address) refuses the connection, and so does a name the runner cannot resolve. An IP
  literal, and a name the job's DNS mode maps, have no name to resolve: they go by address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from enum import Enum

from schemas.proxies import ProxyEndpoint


class Route(Enum):
    DIRECT = "direct"
    BY_ADDRESS = "by address"
    BY_NAME = "by name"


def on_bypass_list(host: str, bypass: Collection[str]) -> bool:
    """Whether ``host`` (in normal form) is on the list (in normal form): named there, or a
    subdomain of a ``*.`` entry's domain."""
    if not bypass:
        return False
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        labels = host.split(".")
        # "*.example.com" covers a.example.com and a.b.example.com, not example.com itself
        if any(f"*.{'.'.join(labels[n:])}" in bypass for n in range(1, len(labels))):
            return True
    return host in bypass


def route(upstream: ProxyEndpoint | None, host: str, *, address_fixed: bool) -> Route:
    """How a connection to ``host`` leaves through ``upstream`` (``None``: no proxy);
    ``address_fixed``: the host is an IP literal or the job's DNS mode maps it."""
    if upstream is None or on_bypass_list(host, upstream.bypass):
        return Route.DIRECT
    if upstream.dns == "proxy" and not address_fixed:
        return Route.BY_NAME
    return Route.BY_ADDRESS
