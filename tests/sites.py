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
            send(self, 200, body, kind)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler, host) as port:
        site = RecordingSite(host, port, token=token)
        yield site


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, kind: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], host: str) -> Iterator[int]:
    """Serve ``handler`` on ``host`` at a free port, on a thread, while in the block."""
    server = ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
