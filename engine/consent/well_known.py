"""The well-known check: the owner serves the claim token at ``/.well-known/trafficbuster.txt``."""

from __future__ import annotations

import asyncio
import http.client
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from engine.consent.finding import Finding, Found
from engine.errors import Invalid, Rejected
from schemas import VERSION

WELL_KNOWN_PATH = "/.well-known/trafficbuster.txt"
MAX_TOKEN_BYTES = 4096
BASE_URL_RULE = "must be an http(s) URL such as https://example.com:8443"

TokenFetcher = Callable[[str], Awaitable[str]]
TRY_LATER = frozenset({408, 429})  # answers that say nothing about the token


def well_known_url(domain: str, base_url: str | None) -> str:
    """Where the token must be served; ``base_url`` may add a scheme and port, not another host."""
    if base_url is None:
        return f"https://{domain}{WELL_KNOWN_PATH}"
    if any(ch.isspace() or not ch.isprintable() for ch in base_url):
        raise Invalid("base_url", f"{BASE_URL_RULE} (no spaces or control characters)")
    try:
        parts = urlsplit(base_url)
        port = parts.port  # a port that is not a number in 0-65535 raises here
    except ValueError as err:
        raise Invalid("base_url", f"{BASE_URL_RULE} ({err})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid("base_url", BASE_URL_RULE)
    if port == 0:
        raise Invalid("base_url", "port must be 1-65535")
    if parts.hostname.lower() != domain:
        raise Rejected("base_url", f"host must be the claimed domain {domain}")
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN_PATH}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the token must be served by the domain itself, not found elsewhere


def fetch_token(url: str, timeout: float = 5.0) -> str:
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(
        url, headers={"User-Agent": f"TrafficBuster/{VERSION} consent-check"}
    )
    with opener.open(request, timeout=timeout) as response:
        return bytes(response.read(MAX_TOKEN_BYTES)).decode("utf-8", "replace").strip()


async def fetch_token_async(url: str) -> str:
    return await asyncio.to_thread(fetch_token, url)


async def check_token(fetch: TokenFetcher, url: str, token: str) -> Finding:
    """Whether ``url`` serves ``token``: a 4xx answer or other content means it is absent
    (the owner took it away); no answer, a 5xx, or a 408 or 429 (come back later) that
    the site could not be asked."""
    try:
        served = await fetch(url)
    except urllib.error.HTTPError as err:
        gone = 400 <= err.code < 500 and err.code not in TRY_LATER
        found = Found.ABSENT if gone else Found.UNREACHABLE
        return Finding(found, url, f"{url} answered HTTP {err.code}")
    except (
        urllib.error.URLError,
        http.client.HTTPException,
        OSError,
        TimeoutError,
        ValueError,  # a URL urllib cannot use
    ) as err:
        reason = f"{url} could not be fetched ({getattr(err, 'reason', err)})"
        return Finding(Found.UNREACHABLE, url, reason)
    if served != token:
        return Finding(Found.ABSENT, url, f"{url} does not serve the claimed token")
    return Finding(Found.SERVED, url)
