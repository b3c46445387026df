"""A loopback site that counts sessions by ``X-TrafficBuster-Flow``: which flows have a
request in flight at once, and when each flow's requests began and ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from tests.sites import send, serving

FLOW_HEADER = "X-TrafficBuster-Flow"
WELL_KNOWN = "/.well-known/trafficbuster.txt"
PAGES = {
    "/": '<html><body style="height:3000px"><a href="/a">A</a> <a href="/b">B</a></body></html>',
    "/a": '<html><body style="height:3000px"><a href="/">home</a> <a href="/b">B</a></body></html>',
    "/b": '<html><body style="height:3000px"><a href="/">home</a> <a href="/a">A</a></body></html>',
}


@dataclass
class FlowSite:
    host: str
    port: int = 0
    token: str | None = None  # served at the well-known path while set
    delay: float = 0.0  # seconds each page takes, so requests are in flight a while
    in_flight: dict[str, int] = field(default_factory=dict)  # flow id -> open requests
    most_at_once: int = 0  # the most flows with a request in flight at one moment
    first_seen: dict[str, float] = field(default_factory=dict)  # flow id -> monotonic
    last_seen: dict[str, float] = field(default_factory=dict)
    unmarked: int = 0  # browsing requests without the flow header
    arrived: threading.Event = field(default_factory=threading.Event)  # any flow request
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def began(self, flow: str) -> None:
        with self.lock:
            now = time.monotonic()
            self.first_seen.setdefault(flow, now)
            self.last_seen[flow] = now
            self.in_flight[flow] = self.in_flight.get(flow, 0) + 1
            busy = sum(1 for n in self.in_flight.values() if n)
            self.most_at_once = max(self.most_at_once, busy)
        self.arrived.set()

    def ended(self, flow: str) -> None:
        with self.lock:
            self.in_flight[flow] -= 1
            self.last_seen[flow] = time.monotonic()

    def flows_since(self, moment: float) -> set[str]:
        """Flows that sent a request at or after ``moment`` (monotonic)."""
        with self.lock:
            return {flow for flow, last in self.last_seen.items() if last >= moment}

    def sessions_overlapping(self) -> int:
        """The most flows whose first-to-last request spans overlap at one moment."""
        with self.lock:
            edges = sorted(
                [(t, 1) for t in self.first_seen.values()]
                + [(t, -1) for t in self.last_seen.values()],
                key=lambda edge: (edge[0], edge[1]),  # an end before a start at one moment
            )
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most


@contextmanager
def flow_site(host: str = "127.0.0.1", delay: float = 0.0) -> Iterator[FlowSite]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == WELL_KNOWN:
                send(self, 200 if site.token else 404, (site.token or "").encode(), "text/plain")
                return
            flow = self.headers.get(FLOW_HEADER)
            if flow is None:
                site.unmarked += 1
                send(self, 404, b"", "text/plain")
                return
            site.began(flow)
            try:
                time.sleep(site.delay)
                page = PAGES.get(path)
                send(self, 200 if page else 404, (page or "").encode(), "text/html")
            finally:
                site.ended(flow)

        def log_message(self, *args: object) -> None:
            pass

    site = FlowSite(host, delay=delay)
    with serving(Handler, host) as port:
        site.port = port
        yield site
