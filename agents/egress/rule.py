"""The egress allow rule: may one flow's browser open a connection to host:port at an address?

Pure: no I/O, no clock. The proxy resolves the name (or maps it), then asks this rule
about each address before connecting, so the check is about the address the bytes
really go to, not a name a resolver might answer differently a moment later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from enum import StrEnum

from schemas.consent_state import WEB_PORTS

__all__ = ["WEB_PORTS", "IpAddress", "Refusal", "allow", "allow_address", "allow_destination"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# cloud instance metadata services: a page must never reach them through a runner
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


class Refusal(StrEnum):
    """Why a connection was refused (the ``reason`` of ``EgressRefused``)."""

    HOST = "host not consented"
    PORT = "port not consented"
    UNRESOLVED = "name not resolved"
    LOOPBACK = "loopback address"
    PRIVATE = "private address"
    LINK_LOCAL = "link-local address"
    METADATA = "metadata address"
    RESERVED = "reserved address"  # unspecified, multicast, reserved ranges
    AUTH = "no flow credentials"
    REQUEST = "malformed request"


def normal_host(host: str) -> str:
    """Lower case, no trailing dot, IPv6 literals without brackets."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def address_class(address: IpAddress) -> Refusal | None:
    """The kind of non-public address this is, or ``None`` for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_class(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return Refusal.METADATA
    if address.is_loopback:
        return Refusal.LOOPBACK
    if address.is_link_local:
        return Refusal.LINK_LOCAL
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return Refusal.RESERVED
    if address.is_private or address in SHARED_ADDRESS_SPACE or not address.is_global:
        return Refusal.PRIVATE
    return None


def as_address(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(normal_host(text).split("%", 1)[0])
    except ValueError:
        return None


def allow_destination(
    host: str, port: int, hosts: Collection[str], ports: Mapping[str, Collection[int]]
) -> Refusal | None:
    """Before resolving: is ``host:port`` one of the flow's consented pairs?

    ``hosts`` are the consented hosts in normal form; ``ports`` their consented ports
    (a host missing from it has the web ports 80 and 443).
    """
    host = normal_host(host)
    if host not in hosts:
        return Refusal.HOST
    if port not in ports.get(host, WEB_PORTS):
        return Refusal.PORT
    return None


def allow_address(
    address: IpAddress, port: int, hosts: Collection[str], ports: Mapping[str, Collection[int]]
) -> Refusal | None:
    """After resolving: a public address is fine; a loopback, private, link-local,
    metadata or reserved one only when the flow's consent names that very address,
    on that port."""
    kind = address_class(address)
    if kind is None:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    for literal in (str(address), str(mapped) if mapped is not None else ""):
        if literal in hosts and port in ports.get(literal, WEB_PORTS):
            return None
    return kind


def allow(
    host: str,
    port: int,
    address: IpAddress | None,
    hosts: Collection[str],
    ports: Mapping[str, Collection[int]],
) -> Refusal | None:
    """The whole rule for one connection: ``None`` when allowed, else why not."""
    refusal = allow_destination(host, port, hosts, ports)
    if refusal is not None:
        return refusal
    if address is None:
        return Refusal.UNRESOLVED
    return allow_address(address, port, hosts, ports)
