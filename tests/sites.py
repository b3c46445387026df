"""Loopback test sites that record every request they receive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Page = Callable[[str], tuple[int, dict[str, str], bytes]]


@dataclass
class RecordingSite:
    host: str
    port: int
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each request
    token: str | None = None  # served at /.well-known/trafficbuster.txt

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@contextmanager
def recording_site(
    host: str = "127.0.0.1", pages: dict[str, str] | None = None, token: str | None = None
) -> Iterator[RecordingSite]:
    pages = pages or {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            site.arrived.append(time.monotonic())
            site.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            if self.path == "/.well-known/trafficbuster.txt" and site.token is not None:
                body, kind = site.token.encode(), "text/plain"
            elif self.path.split("?")[0] in pages:
                body, kind = pages[self.path.split("?")[0]].encode(), "text/html"
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    site = RecordingSite(host, server.server_address[1], token=token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
