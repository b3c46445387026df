"""The DNS check: the owner publishes the claim token as a TXT record
``_trafficbuster.<domain>``. Control of the zone, unlike one web server, may also prove
control of every subdomain (a claim with ``include_subdomains``).

Resolved with dnspython at the name server the server is configured with
(``TB_DNS_RESOLVER``, ``host`` or ``host:port``), else the system's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from engine.consent.finding import Finding, Found
from engine.errors import Invalid

RECORD_PREFIX = "_trafficbuster"
RESOLVER_RULE = "must be an IP address, optionally with a port: 127.0.0.1:5353 or [::1]:53"


def record_name(domain: str) -> str:
    return f"{RECORD_PREFIX}.{domain}"


def dns_evidence(domain: str) -> str:
    return f"dns:{record_name(domain)}"


@dataclass(frozen=True)
class NameServer:
    host: str
    port: int = 53


def parse_name_server(raw: str) -> NameServer:
    """``host``, ``host:port`` or ``[v6]:port``: the name server to ask."""
    text = raw.strip()
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise Invalid("TB_DNS_RESOLVER", RESOLVER_RULE)
        text_port = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, text_port = text.split(":")
    else:
        text_port = ""
    if text_port:
        if not text_port.isdigit() or not 1 <= int(text_port) <= 65535:
            raise Invalid("TB_DNS_RESOLVER", RESOLVER_RULE)
        port = int(text_port)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise Invalid("TB_DNS_RESOLVER", RESOLVER_RULE) from None
    return NameServer(host, port)


@dataclass(frozen=True)
class TxtLookup:
    """Reads TXT records; ``server`` None asks the system's resolvers."""

    server: NameServer | None = None
    timeout: float = 5.0

    def _resolver(self) -> dns.asyncresolver.Resolver:
        if self.server is None:
            return dns.asyncresolver.Resolver()
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(self.server.host, self.server.port)]
        return resolver

    async def texts(self, name: str) -> list[str]:
        """Each TXT record's strings joined; raises dnspython's errors."""
        answer = await self._resolver().resolve(
            name, dns.rdatatype.TXT, lifetime=self.timeout, search=False
        )
        return [b"".join(rdata.strings).decode("utf-8", "replace").strip() for rdata in answer]


async def check_dns_token(lookup: TxtLookup, domain: str, token: str) -> Finding:
    """Whether ``_trafficbuster.<domain>`` holds ``token`` among its TXT records."""
    name = record_name(domain)
    evidence = dns_evidence(domain)
    try:
        texts = await lookup.texts(name)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Finding(Found.ABSENT, evidence, f"{name} has no TXT record")
    except (dns.exception.DNSException, OSError) as err:
        return Finding(Found.UNREACHABLE, evidence, f"{name} could not be resolved ({err})")
    if token not in texts:
        return Finding(Found.ABSENT, evidence, f"{name} does not hold the claimed token")
    return Finding(Found.SERVED, evidence)
