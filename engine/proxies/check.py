"""The health check of a proxy that was marked bad: can it still open a tunnel?

The check opens a tunnel through the proxy to a host that has valid consent, on the
port that consent was verified on, and closes it at once: the consented host sees at
most a TCP connection, and nothing goes to any other host. A proxy that cannot reach
one consented host (which may itself be down) is tried with the next, up to three.
With no valid consent at all it only opens a TCP connection to the proxy itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from urllib.parse import urlsplit

from engine.proxies.tunnel import open_tunnel
from schemas.consent_state import Consent
from schemas.proxies import ProxyEndpoint, ProxyError

Target = tuple[str, int]
ProxyCheck = Callable[[ProxyEndpoint, Target | None, float], Awaitable[str | None]]

DEFAULT_PORTS = {"http": 80, "https": 443}


def check_targets(
    consents: Iterable[Consent], evidence: dict[str, str], now: datetime, most: int = 3
) -> list[Target]:
    """Consented hosts, each with the port its consent was verified on (by name, at most
    ``most``): a check that cannot reach the first (that host may be down) tries the next."""
    found: list[Target] = []
    for consent in sorted(consents, key=lambda c: c.domain):
        if len(found) == most:
            break
        if consent.valid_at(now):
            parts = urlsplit(evidence.get(consent.domain, ""))
            found.append((consent.domain, parts.port or DEFAULT_PORTS.get(parts.scheme, 443)))
    return found


# the policy's bound, passed on to the tunnel (it covers connect and handshake together)
async def check_proxy(
    proxy: ProxyEndpoint,
    target: Target | None,
    timeout: float,  # noqa: ASYNC109
) -> str | None:
    """Why the proxy fails, or ``None`` when it opened the tunnel."""
    try:
        if target is None:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(proxy.host, proxy.port)
        else:
            _, writer = await open_tunnel(proxy, *target, timeout=timeout)
    except ProxyError as err:
        return f"{err.kind}: {err}"
    except TimeoutError:
        return f"timeout: {proxy.label} did not answer within {timeout:g}s"
    except OSError as err:
        return f"unreachable: {proxy.label} unreachable: {err.strerror or type(err).__name__}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def check_name(proxy: ProxyEndpoint, target: Target | None) -> str:
    if target is None:
        return f"TCP connect to {proxy.label}"
    return f"tunnel through {proxy.label} to {target[0]}:{target[1]}"
