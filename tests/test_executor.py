"""The Playwright executor in real Chromium, against recording sites on loopback.

127.0.0.1 plays the authorised site; a second server on 127.0.0.2 plays a host
the flow is not authorised for, and must never see a single request.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import httpx
import pytest
import pytest_asyncio
from litestar.testing import AsyncTestClient
from playwright.async_api import async_playwright
from websockets.asyncio.server import ServerConnection, serve

from agents.browser import (
    BrowserMissing,
    find_chromium,
    launch_chromium,
    managed_chromium_installed,
)
from agents.executor import AllowedHosts, FlowError, NoopExecutor
from agents.human import PageTrail
from agents.playwright_flow import PlaywrightExecutor
from demo.site import EXTERNAL_URL, build_demo_app, serve_demo_site
from schemas.events import FlowDispatched, LinkPick, PageTimings
from schemas.values import DnsEntry, JobSettings

VERSION = "9.9.9-test"
JOB = "job-exec-1"

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]
NO_CHROMIUM = "no Chromium: apt-get install chromium, or python -m playwright install chromium"


def without_chromium(env: Mapping[str, str]) -> Literal["skip", "fail"]:
    """What a browser test does where no Chromium is installed: a developer's machine
    skips it; CI (which sets CI=true) fails it, so CI never passes by skipping."""
    return "fail" if env.get("CI", "").lower() in ("true", "1") else "skip"


@pytest.fixture(scope="session")
def chromium() -> None:
    if find_chromium() is not None or managed_chromium_installed():
        return
    if without_chromium(os.environ) == "fail":
        pytest.fail(f"{NO_CHROMIUM} (CI=true: browser tests must run)", pytrace=False)
    pytest.skip(NO_CHROMIUM)


needs_chromium = pytest.mark.usefixtures("chromium")


# -- recording sites -----------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    path: str
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


class RecordingSite:
    """A loopback HTTP server that records every request; unknown paths get a 404."""

    def __init__(self, host: str) -> None:
        self.replies: dict[str, Reply] = {}
        self.hits: list[Hit] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}))
                for loop, event, n in list(site._waiters):
                    if len(site.hits) >= n:
                        loop.call_soon_threadsafe(event.set)
                reply = site.replies.get(self.path.split("?")[0], Reply(404, "not found"))
                body = reply.body.encode()
                self.send_response(reply.status)
                headers = {"Content-Type": "text/html; charset=utf-8", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.origin = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def page(self, path: str, body: str, status: int = 200) -> str:
        self.replies[path] = Reply(status, f"<!doctype html><html><body>{body}</body></html>")
        return self.origin + path

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.replies[path] = Reply(status, "", {"Location": location})
        return self.origin + path

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]

    async def wait_hits(self, n: int, timeout: float = 10) -> None:
        """Return once the site has seen ``n`` requests (awaited, never polled)."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event, n)
        self._waiters.append(waiter)
        try:
            if len(self.hits) < n:
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self._waiters.remove(waiter)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[RecordingSite]:
    s = RecordingSite("127.0.0.1")
    yield s
    s.close()


@pytest.fixture
def evil() -> Iterator[RecordingSite]:
    s = RecordingSite("127.0.0.2")
    s.page("/", "<a href='/'>you should not be here</a>")
    yield s
    s.close()


@dataclass
class RecordedReport:
    visits: list[tuple[str, int | None]] = field(default_factory=list)
    clicks: list[str] = field(default_factory=list)
    skips: list[tuple[str, str]] = field(default_factory=list)
    proxy_failures: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[tuple[str, int, str, str]] = field(default_factory=list)
    keepalives: int = 0

    async def page_visited(
        self, url: str, status: int | None, timings: PageTimings | None = None
    ) -> None:
        self.visits.append((url, status))

    async def page_left(self, url: str, trail: PageTrail, timings: PageTimings | None) -> None:
        pass

    async def click_done(self, href: str, link: LinkPick | None = None) -> None:
        self.clicks.append(href)

    async def click_skipped(self, href: str, reason: str) -> None:
        self.skips.append((href, reason))

    async def egress_refused(self, host: str, port: int, reason: str, request: str) -> None:
        self.refusals.append((host, port, reason, request))

    async def proxy_failed(self, proxy_id: str, proxy: str, error: str, reason: str) -> None:
        self.proxy_failures.append((proxy_id, error))

    async def keepalive(self) -> None:
        self.keepalives += 1


def flow(
    url: str,
    *,
    clicks: int = 0,
    session_seconds: float = 0.3,
    seed: int = 1,
    job_id: str = JOB,
    flow_id: str = "flow-1",
    referrer: str | None = None,
    allowed_hosts: tuple[str, ...] = ("127.0.0.1",),
    allowed_ports: dict[str, list[int]] | None = None,
    host_map: dict[str, str] | None = None,
) -> FlowDispatched:
    return FlowDispatched(
        id="evt-1",
        at=datetime.now(UTC),
        actor="system",
        job_id=job_id,
        flow_id=flow_id,
        attempt=1,
        target_index=0,
        url=url,
        clicks=clicks,
        session_seconds=session_seconds,
        allowed_hosts=list(allowed_hosts),
        seed=seed,
        referrer=referrer,
        allowed_ports=allowed_ports or {},
        settings=JobSettings(
            session_seconds=session_seconds,
            dns=tuple(DnsEntry(host, address) for host, address in (host_map or {}).items()),
        )
        if host_map
        else None,
    )


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def nav(*paths: str) -> str:
    return "<nav>" + " ".join(f"<a href='{p}'>{p}</a>" for p in paths) + "</nav>"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def executor() -> AsyncIterator[PlaywrightExecutor]:
    ex = PlaywrightExecutor(VERSION)
    await ex.start()
    yield ex
    await ex.close()


# -- identification ------------------------------------------------------------------


@needs_chromium
async def test_every_request_carries_job_header_and_user_agent(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    site.replies["/style.css"] = Reply(200, "body{margin:0}", {"Content-Type": "text/css"})
    script = "fetch('/api'); new WebSocket(location.origin.replace('http', 'ws') + '/socket')"
    site.replies["/app.js"] = Reply(200, script, {"Content-Type": "text/javascript"})
    site.page("/frame", "inner")
    site.page("/api", "{}")
    url = site.page(
        "/",
        "<link rel=stylesheet href='/style.css'><img src='/img.png'>"
        "<iframe src='/frame'></iframe><script src='/app.js'></script>",
    )
    referrer = "https://campaign.example/landing"

    await executor.run(flow(url, referrer=referrer, session_seconds=0.5), RecordedReport())

    expected = {"/", "/style.css", "/img.png", "/frame", "/app.js", "/api", "/socket"}
    assert expected <= set(site.paths())
    for hit in site.hits:
        assert hit.headers.get("x-trafficbuster") == JOB, hit.path
        assert hit.headers["user-agent"].endswith(f" TrafficBuster/{VERSION}"), hit.path
    assert site.hits[0].headers.get("referer") == referrer


@pytest.mark.slow
@needs_chromium
async def test_concurrent_flows_keep_their_own_job_header(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    for name in ("a", "b"):
        site.page(f"/{name}", f"<img src='/{name}.png'>{nav(f'/{name}/next')}")
        site.page(f"/{name}/next", "the end")

    await asyncio.gather(
        *(
            executor.run(flow(f"{site.origin}/{n}", clicks=1, job_id=f"job-{n}"), RecordedReport())
            for n in ("a", "b")
        )
    )

    assert len(site.hits) >= 6
    for hit in site.hits:
        if hit.path != "/favicon.ico":
            assert hit.headers.get("x-trafficbuster") == f"job-{hit.path[1]}", hit.path


# -- the journey ---------------------------------------------------------------------


@needs_chromium
async def test_flow_follows_internal_links_for_its_session(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    pages = ("/", "/one", "/two", "/three")
    for path in pages:
        links = nav(*(p for p in pages if p != path))
        site.page(path, f"<a href='#top'>top</a> <a href='mailto:x@y.z'>mail</a>{links}<p>text</p>")
    report = RecordedReport()

    started = time.monotonic()
    result = await executor.run(flow(site.origin + "/", clicks=2, session_seconds=1.0), report)
    elapsed = time.monotonic() - started

    assert (result.clicks_done, result.pages) == (2, 3)
    assert len(report.clicks) == 2 and len(report.visits) == 3
    assert [url for url, _ in report.visits[1:]] == report.clicks
    assert all(status == 200 for _, status in report.visits)
    assert 1.0 <= elapsed < 10.0  # the session's length, bounded: no runaway (not a speed test)
    assert report.keepalives >= 1 and report.skips == []


@pytest.mark.slow
@needs_chromium
async def test_same_seed_clicks_same_links(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    pages = [f"/p{i}" for i in range(8)]
    for path in pages:
        site.page(path, nav(*pages))

    async def clicked(seed: int) -> list[str]:
        report = RecordedReport()
        await executor.run(flow(site.origin + "/p0", clicks=4, seed=seed), report)
        return report.clicks

    first = await clicked(seed=7)
    assert len(first) == 4
    assert await clicked(seed=7) == first
    assert await clicked(seed=8) != first


# -- authorisation (DESIGN invariant 4) ----------------------------------------------


@needs_chromium
async def test_links_to_unauthorised_hosts_are_reported_never_followed(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    evil_links = [f"{evil.origin}/", f"{evil.origin}/offer"]
    url = site.page("/", "".join(f"<a href='{href}'>out</a>" for href in evil_links))
    report = RecordedReport()

    result = await executor.run(flow(url, clicks=2), report)

    assert result.clicks_done == 0
    assert len(report.skips) == 1
    assert report.skips[0][0] in evil_links and report.skips[0][1] == "unauthorised_host"
    assert evil.hits == []


@needs_chromium
async def test_clicked_redirect_to_unauthorised_host_is_refused(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    site.redirect("/out", f"{evil.origin}/landing")
    url = site.page("/", nav("/out"))
    report = RecordedReport()

    result = await executor.run(flow(url, clicks=1), report)

    assert result.clicks_done == 0
    assert report.skips == [(f"{evil.origin}/landing", "unauthorised_host")]
    assert report.visits == [(url, 200)]
    assert evil.hits == []


@needs_chromium
async def test_first_page_redirecting_off_site_fails_without_retry(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    url = site.redirect("/", f"{evil.origin}/")
    report = RecordedReport()

    with pytest.raises(FlowError) as failure:
        await executor.run(flow(url), report)

    assert failure.value.reason.startswith("unauthorised_host")
    assert not failure.value.retryable
    assert report.skips == [(f"{evil.origin}/", "unauthorised_host")]
    assert evil.hits == []


@needs_chromium
async def test_every_redirect_hop_is_checked(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    # Playwright routes only the first request of a redirect chain: without the
    # guard re-issuing each hop, the second redirect here would reach 127.0.0.2.
    site.redirect("/hop1", "/hop2", status=301)
    site.redirect("/hop2", "/final", status=307)
    site.redirect("/chain1", "/chain2")
    site.redirect("/chain2", f"{evil.origin}/chained")
    site.redirect("/img-out", f"{evil.origin}/pixel.png")
    site.redirect("/frame-hop", "/framed")
    site.page("/framed", "framed")
    site.page(
        "/final", "<img src='/img-out'><iframe src='/frame-hop'></iframe><a href='/chain1'>more</a>"
    )
    report = RecordedReport()

    result = await executor.run(flow(site.origin + "/hop1", clicks=1, session_seconds=0.5), report)

    assert report.visits == [(site.origin + "/final", 200)]
    assert result.clicks_done == 0
    assert report.skips == [(f"{evil.origin}/chained", "unauthorised_host")]
    assert site.paths()[:3] == ["/hop1", "/hop2", "/final"]
    assert {"/img-out", "/framed", "/chain1", "/chain2"} <= set(site.paths())
    assert evil.hits == []


@pytest.mark.slow
@needs_chromium
async def test_frames_and_subresources_of_unauthorised_hosts_never_load(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    ws_url = evil.origin.replace("http:", "ws:") + "/socket"
    site.redirect("/frame-out", f"{evil.origin}/framed")
    worker = f"fetch('{evil.origin}/worker').catch(() => 0)"
    url = site.page(
        "/",
        f"<link rel=icon href='{evil.origin}/favicon.ico'><iframe src='/frame-out'></iframe>"
        f'<script>new Worker(URL.createObjectURL(new Blob(["{worker}"])))</script>'
        f"<link rel=stylesheet href='{evil.origin}/style.css'>"
        f"<iframe src='{evil.origin}/frame'></iframe><img src='{evil.origin}/pixel.png'>"
        f"<script src='{evil.origin}/tag.js'></script>"
        f"<script>fetch('{evil.origin}/api', {{mode: 'no-cors'}}).catch(() => 0);"
        f"new WebSocket('{ws_url}');</script>",
    )
    report = RecordedReport()

    await executor.run(flow(url, session_seconds=0.5), report)

    assert evil.hits == []
    assert (f"{evil.origin}/frame", "unauthorised_host") in report.skips
    assert (f"{evil.origin}/framed", "unauthorised_host") in report.skips


@needs_chromium
async def test_popup_is_guarded_like_the_flow_page(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    site.redirect("/img-out", f"{evil.origin}/pixel.png")
    site.page("/popup", f"<img src='/img-out'><iframe src='{evil.origin}/frame'></iframe>")
    url = site.page("/", "<script>window.open('/popup')</script>")
    report = RecordedReport()

    # long enough for the popup to load on a busy machine
    await executor.run(flow(url, session_seconds=2.0), report)

    assert {"/popup", "/img-out"} <= set(site.paths())
    assert report.skips == [(f"{evil.origin}/frame", "unauthorised_host")]
    assert evil.hits == []


@needs_chromium
async def test_script_navigation_off_site_is_refused_and_the_page_stays(
    executor: PlaywrightExecutor, site: RecordingSite, evil: RecordingSite
) -> None:
    site.page("/next", "next page")
    script = f"<script>setTimeout(() => {{ location.href = '{evil.origin}/away'; }}, 50)</script>"
    url = site.page("/", script + nav("/next"))
    report = RecordedReport()

    result = await executor.run(flow(url, clicks=1, session_seconds=0.6), report)

    assert report.skips == [(f"{evil.origin}/away", "unauthorised_host")]
    assert result.clicks_done == 1
    assert evil.hits == []


@dataclass
class SocketServer:
    """A websocket server on 127.0.0.2 that records when each frame arrives."""

    url: str = ""
    frames: list[tuple[float, str]] = field(default_factory=list)  # (arrived, payload)
    first: asyncio.Event = field(default_factory=asyncio.Event)

    async def record(self, connection: ServerConnection) -> None:
        async for message in connection:
            self.frames.append((time.monotonic(), str(message)))
            self.first.set()


@pytest_asyncio.fixture(loop_scope="module")
async def socket_server() -> AsyncIterator[SocketServer]:
    recorder = SocketServer()
    async with serve(recorder.record, "127.0.0.2", 0) as server:
        recorder.url = f"ws://127.0.0.2:{next(iter(server.sockets)).getsockname()[1]}/live"
        yield recorder


@pytest.mark.slow
@needs_chromium
async def test_revoked_host_gets_nothing_more_while_the_flow_goes_on(
    executor: PlaywrightExecutor,
    site: RecordingSite,
    evil: RecordingSite,
    socket_server: SocketServer,
) -> None:
    # 127.0.0.2 is a second authorised host here, until its consent is revoked mid-flow.
    # Every request and frame carries the page's clock (Date.now(), ms) when it was made.
    evil.page("/ping", "pong")
    site.page("/ping", "pong")
    script = (
        f"const ws = new WebSocket('{socket_server.url}');"
        "setInterval(() => {"
        f" fetch('{evil.origin}/ping?' + Date.now(), {{mode: 'no-cors'}}).catch(() => 0);"
        f" new Image().src = '{evil.origin}/pixel.png?' + Date.now();"
        " fetch('/ping?' + Date.now()).catch(() => 0);"
        " if (ws.readyState === 1) ws.send(String(Date.now()));"
        "}, 50);"
    )
    url = site.page("/", f"<script>{script}</script>")
    hosts = AllowedHosts(["127.0.0.1", "127.0.0.2"])
    ports = [port_of(site.origin), port_of(evil.origin), port_of(socket_server.url)]
    item = flow(
        url,
        session_seconds=3.0,
        allowed_hosts=("127.0.0.1", "127.0.0.2"),
        allowed_ports={"127.0.0.1": ports, "127.0.0.2": ports},
    )
    running = asyncio.create_task(executor.run(item, RecordedReport(), hosts))
    await evil.wait_hits(6)
    await asyncio.wait_for(socket_server.first.wait(), 10)

    revoked_at, revoked_ms = time.monotonic(), time.time() * 1000
    hosts.revoke("127.0.0.2")
    result = await running

    def made_after(payload: str) -> bool:  # by the page's clock, with 50 ms for skew
        return int(payload.rsplit("?", 1)[-1]) > revoked_ms + 50

    assert result.pages == 1  # the flow went on to the end of its session
    # nothing the page made after the revocation reached the host ...
    assert [h.path for h in evil.hits if made_after(h.path)] == []
    assert [p for _, p in socket_server.frames if made_after(p)] == []
    # ... and what was under way when it came had arrived within 2 s
    assert [h.path for h in evil.hits if h.at > revoked_at + 2.0] == []
    assert [p for at, p in socket_server.frames if at > revoked_at + 2.0] == []
    assert any(made_after(h.path) for h in site.hits if "?" in h.path)  # its own host: yes


# -- failures ------------------------------------------------------------------------


@needs_chromium
async def test_server_error_on_first_page_is_retryable_with_screenshot(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>Internal Server Error</h1>", status=500)

    with pytest.raises(FlowError) as failure:
        await executor.run(flow(url, flow_id="flow-500"), RecordedReport())

    assert (failure.value.reason, failure.value.retryable) == ("http_500", True)
    assert failure.value.screenshot is not None  # the runner stores it in tb_screenshots
    assert failure.value.screenshot.startswith(b"\x89PNG")


@needs_chromium
async def test_missing_first_page_is_not_retryable(
    executor: PlaywrightExecutor, site: RecordingSite
) -> None:
    with pytest.raises(FlowError) as failure:
        await executor.run(flow(site.origin + "/gone"), RecordedReport())

    assert (failure.value.reason, failure.value.retryable) == ("http_404", False)


@needs_chromium
async def test_unreachable_first_page_is_retryable(executor: PlaywrightExecutor) -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        with pytest.raises(FlowError) as failure:
            await executor.run(flow(url), RecordedReport())

    # the egress proxy answers 502 Bad Gateway for a host it cannot connect to
    assert failure.value.retryable
    assert failure.value.reason.startswith("navigation_failed")


# -- browser discovery ---------------------------------------------------------------


async def test_explicit_chromium_path_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TB_CHROMIUM", "/opt/custom/chrome")
    assert find_chromium() == "/opt/custom/chrome"


async def test_no_launchable_chromium_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TB_CHROMIUM", str(tmp_path / "no-such-chromium"))
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path / "empty"))
    async with async_playwright() as playwright:
        with pytest.raises(BrowserMissing) as missing:
            await launch_chromium(playwright)
    assert "apt-get install chromium (Debian/Ubuntu)" in str(missing.value)
    assert "python -m playwright install --with-deps chromium" in str(missing.value)


async def test_missing_chromium_skips_locally_and_fails_in_ci() -> None:
    assert without_chromium({}) == "skip"
    assert without_chromium({"CI": "false"}) == "skip"
    assert without_chromium({"CI": "true"}) == "fail"


async def test_noop_executor_completes_at_once() -> None:
    result = await NoopExecutor().run(flow("http://127.0.0.1/", clicks=3), RecordedReport())
    assert (result.clicks_done, result.pages) == (3, 1)


# -- the demo site -------------------------------------------------------------------


async def test_demo_site_serves_its_consent_token(tmp_path: Path) -> None:
    token_file = tmp_path / "trafficbuster.txt"
    async with AsyncTestClient(app=build_demo_app(token_file)) as client:
        missing = await client.get("/.well-known/trafficbuster.txt")
        token_file.write_text("tb-verify-123\n")
        served = await client.get("/.well-known/trafficbuster.txt")

    assert missing.status_code == 404
    assert served.status_code == 200
    assert served.text == "tb-verify-123"
    assert served.headers["content-type"].startswith("text/plain")


async def test_demo_site_pages_link_internally_and_out(tmp_path: Path) -> None:
    async with AsyncTestClient(app=build_demo_app(tmp_path / "token")) as client:
        pages = ["/", "/products", "/about", "/contact"] + [f"/products/{i}" for i in range(1, 6)]
        for path in pages:
            response = await client.get(path)
            assert response.status_code == 200, path
            assert 'href="/products"' in response.text and EXTERNAL_URL in response.text
        assert (await client.get("/products/6")).status_code == 404
        assert (await client.get("/healthz")).text == "ok"
        out = await client.get("/redirect-out", follow_redirects=False)
        assert (out.status_code, out.headers["location"]) == (302, EXTERNAL_URL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_chromium
async def test_flow_on_demo_site_clicks_through_and_records_the_partner_link(
    executor: PlaywrightExecutor, tmp_path: Path
) -> None:
    port = free_port()
    ready = asyncio.Event()
    serving = asyncio.create_task(serve_demo_site("127.0.0.1", port, tmp_path / "token", ready))
    origin = f"http://127.0.0.1:{port}"
    try:
        listening = asyncio.ensure_future(ready.wait())
        # the site listens, or fails to start: whichever comes first, within 10 s
        await asyncio.wait({serving, listening}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        assert ready.is_set(), serving.exception() if serving.done() else "not listening in 10 s"
        async with httpx.AsyncClient() as client:
            assert (await client.get(origin + "/healthz")).text == "ok"
        report = RecordedReport()
        result = await executor.run(flow(origin + "/", clicks=3), report)
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving

    assert result.clicks_done == 3
    assert all(href.startswith(origin) for href in report.clicks)
    assert (EXTERNAL_URL, "unauthorised_host") in report.skips
    with socket.socket() as sock:  # the site is gone once cancelled
        assert sock.connect_ex(("127.0.0.1", port)) != 0
