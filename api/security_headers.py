"""Headers every response carries, set on the way out so that errors, 404s, the OpenAPI
pages and refused WebSocket upgrades get them as well as the routes.

The API answers tokens and keys: nothing it says may be cached (``no-store``), framed,
sniffed into another type or leak its URL to another site. A page sets its own
Content-Security-Policy (the dashboard: ``page_csp``); anything else gets one that
allows nothing, since JSON needs no scripts.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from litestar.datastructures import MutableScopeHeaders
from litestar.types import BeforeMessageSendHookHandler, Message, Scope

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Litestar's OpenAPI pages (/schema) load their viewer from its CDN and start it inline
DOCS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline' https://cdn.redoc.ly https://cdn.jsdelivr.net"
    " https://unpkg.com; style-src 'unsafe-inline' https://fonts.googleapis.com"
    " https://cdn.jsdelivr.net https://unpkg.com; font-src https://fonts.gstatic.com;"
    " img-src https://cdn.jsdelivr.net https://cdn.redoc.ly data:; worker-src blob:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
HSTS = "max-age=31536000; includeSubDomains"
DOCS_PATH = "/schema"

ALWAYS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}

_INLINE = {
    "script": re.compile(r"<script>(.*?)</script>", re.DOTALL),
    "style": re.compile(r"<style>(.*?)</style>", re.DOTALL),
}


def _hashes(blocks: Iterable[str]) -> str:
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
    )


def page_csp(html: str) -> str:
    """The Content-Security-Policy of a page of ours: its own inline ``<script>`` and
    ``<style>`` blocks (by hash, so an injected one does not run), requests to this
    origin only (REST, WebSocket), never framed."""
    script, style = (_hashes(pattern.findall(html)) or "'none'" for pattern in _INLINE.values())
    return (
        f"default-src 'none'; script-src {script}; style-src {style}; connect-src 'self';"
        " img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def security_headers(*, hsts: bool) -> BeforeMessageSendHookHandler:
    """A ``before_send`` hook adding the headers to every HTTP response and to a
    WebSocket upgrade's answer (accepted or refused); HSTS only when ``hsts`` (the
    installation is reached over TLS: a browser then refuses plain HTTP to it)."""
    fixed = dict(ALWAYS)
    if hsts:
        fixed["strict-transport-security"] = HSTS

    async def add(message: Message, scope: Scope) -> None:
        if message["type"] not in (
            "http.response.start",
            "websocket.accept",
            "websocket.http.response.start",
        ):
            return
        message.setdefault("headers", [])
        headers = MutableScopeHeaders.from_message(message)
        for name, value in fixed.items():
            headers[name] = value
        if "content-security-policy" not in headers:
            docs = scope["path"].startswith(DOCS_PATH) and "html" in headers.get("content-type", "")
            headers["content-security-policy"] = DOCS_CSP if docs else API_CSP
        if "cache-control" not in headers:
            headers["cache-control"] = "no-store"

    return add
