"""Which web pages may use the API from a browser: the dashboard's own origin, and the
origins the operator lists (TB_ALLOWED_ORIGINS). Others get no CORS headers (their
scripts cannot read an answer) and no WebSocket (a page elsewhere cannot ride the
browser's login into /ws: browsers apply no CORS to WebSockets, so the upgrade's
Origin is checked here)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.pages import NEXT_CURSOR

ANY = "*"
# response headers a page elsewhere needs to read (paging, downloads, throttling)
EXPOSED = [NEXT_CURSOR, "Link", "Content-Disposition", "Retry-After"]
_DEFAULT_PORTS = {"http": 80, "https": 443}


class BadOrigin(ValueError):
    pass


def parse_origin(raw: str) -> str:
    """``raw`` as a browser sends it in ``Origin`` (``https://host[:port]``, lower case,
    no default port), or ``*``; BadOrigin saying what is wrong otherwise."""
    text = raw.strip()
    if text == ANY:
        return ANY
    parts = urlsplit(text)
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        raise BadOrigin(f"{text!r} is not an origin like https://dashboard.example.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise BadOrigin(f"{text!r}: an origin is scheme://host[:port], without path or user")
    if "*" in text:
        raise BadOrigin(f"{text!r}: list each origin; '*' stands alone or not at all")
    try:
        port = parts.port
    except ValueError:
        raise BadOrigin(f"{text!r}: the port is not a number from 1 to 65535") from None
    scheme = parts.scheme.lower()
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")


def cors_config(origins: tuple[str, ...], credentials: bool) -> CORSConfig | None:
    """None (same origin only: browsers then refuse every cross-origin read) unless
    origins are listed."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins), allow_credentials=credentials, expose_headers=EXPOSED
    )


async def no_cors_without_an_admitted_origin(message: Message, scope: Scope) -> None:
    """``before_send`` hook: Litestar adds its CORS headers (credentials among them) to
    the answer to any origin, and its allow-origin to admitted ones only; an answer that
    admits no origin carries no CORS header at all."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    if "access-control-allow-origin" not in headers:
        for name in [k for k in headers if k.lower().startswith("access-control-")]:
            del headers[name]


def same_origin(origin: str, scope: Scope) -> bool:
    """The page came from the host the request was sent to (the dashboard itself)."""
    host = Headers.from_scope(scope).get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def websocket_origin_guard(origins: tuple[str, ...]) -> Any:
    """Litestar middleware: a WebSocket upgrade from a page of another origin is refused
    (403); one without ``Origin`` is no browser's and passes on to authentication."""
    allowed = set(origins)

    def middleware(app: ASGIApp) -> ASGIApp:
        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.WEBSOCKET:
                await app(scope, receive, send)
                return
            send = answered_refusals(scope, send)
            origin = Headers.from_scope(scope).get("origin")
            if origin and not ({ANY, origin} & allowed or same_origin(origin, scope)):
                reason = f"origin {origin} may not open a WebSocket here"
                await send({"type": "websocket.close", "code": 4403, "reason": reason})
                return
            await app(scope, receive, send)

        return guarded

    return middleware


def answered_refusals(scope: Scope, send: Send) -> Send:
    """A WebSocket closed before it was accepted becomes an HTTP answer (status and a
    JSON body with the reason, and the headers every response gets) where the server
    can send one; otherwise the server answers a bare 403."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        return send
    accepted = False

    async def refuse_in_http(message: Message) -> None:
        nonlocal accepted
        if message["type"] == "websocket.accept":
            accepted = True
        if message["type"] != "websocket.close" or accepted:
            await send(message)
            return
        code = int(message.get("code") or 1000)
        status = code - 4000 if 4400 <= code < 4600 else 403  # Litestar's 4000 + status
        detail = str(message.get("reason") or "WebSocket refused")
        body = json.dumps({"status_code": status, "detail": detail}).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})

    return refuse_in_http
