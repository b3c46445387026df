"""Holds a flow's browser to its authorised hosts (DESIGN invariant 4).

Playwright does not route the later steps of a redirect chain, not even when the
route fulfils the 3xx itself, so navigations never follow a redirect: an
authorised one is re-issued as a new navigation (checked again), an unauthorised
one is aborted and reported. Sub-resource redirects are held by a DevTools URL
allowlist per page, websockets by their own route.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import structlog
from playwright.async_api import (
    BrowserContext,
    CDPSession,
    Frame,
    Page,
    Request,
    Response,
    Route,
    WebSocketRoute,
)
from playwright.async_api import Error as PlaywrightError
from structlog.typing import FilteringBoundLogger

from agents.browser import first_line
from agents.executor import AllowedHosts, FlowReport

log = structlog.get_logger("tb.agent")

MAX_REDIRECTS = 20
UNAUTHORISED_HOST = "unauthorised_host"
REVOKED = "consent revoked"
WEB_SCHEMES = frozenset({"http", "https"})
SOCKET_SCHEMES = frozenset({"ws", "wss"})
INERT_SCHEMES = frozenset({"data", "blob", "about"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NAVIGATION_TIMEOUT_MS = 30_000

# -- the authorisation guard --------------------------------------------------------


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # e.g. a malformed IPv6 literal: matches no allowed host
        return ""


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


class HostGuard:
    """Keeps one flow's browser context on its authorised hosts (DESIGN invariant 4).

    Every routed request to another host, or with a scheme other than http(s), is
    aborted before it leaves the browser. Playwright routes a request once and never
    shows a redirect hop to the handler (Chromium follows it unrouted, even after
    ``route.fulfill`` with a 3xx), so the guard fetches navigations itself without
    following redirects: a redirect to an unauthorised host is refused, and an
    authorised one becomes a fresh navigation of the frame, which is routed again.
    Subresource redirect hops cannot be re-issued; a DevTools URL allowlist on each
    page blocks those. A popup's first request comes before its page can be locked,
    so a popup opens blank and navigates once locked. WebSockets bypass routing and
    have their own check.
    """

    def __init__(
        self,
        allowed_hosts: AllowedHosts | Iterable[str],
        report: FlowReport,
        flog: FilteringBoundLogger,
    ) -> None:
        self.hosts = (
            allowed_hosts
            if isinstance(allowed_hosts, AllowedHosts)
            else AllowedHosts(allowed_hosts)
        )
        self.report = report
        self.log = flog
        self.refused: list[str] = []  # navigations refused, in order
        self._reported: set[str] = set()
        self._redirects: dict[Frame, asyncio.Task[Response | None]] = {}
        self._hops: dict[Frame, int] = {}
        self._tasks: set[asyncio.Task[Response | None]] = set()
        self._locks: dict[Page, asyncio.Future[None]] = {}
        self._popups: deque[tuple[str, str | None]] = deque()  # first navigations held back
        self._sessions: dict[Page, CDPSession] = {}
        self._sockets: set[tuple[str, WebSocketRoute, WebSocketRoute]] = set()
        self._chores: set[asyncio.Task[None]] = set()
        self._unwatch: Callable[[], None] | None = None

    @property
    def allowed(self) -> frozenset[str]:
        """The hosts allowed now: a revoked one has left the set."""
        return self.hosts.current

    def allows(self, url: str, schemes: frozenset[str] = WEB_SCHEMES) -> bool:
        return scheme_of(url) in schemes and host_of(url) in self.allowed

    async def install(self, context: BrowserContext) -> None:
        self._unwatch = self.hosts.watch(self._on_revoked)
        await context.route("**/*", self._on_request)
        await context.route_web_socket(lambda _url: True, self._on_web_socket)
        context.on("page", self._on_page)  # popups; the flow's own page is locked first

    async def lock_page(self, page: Page) -> None:
        """Block the page's requests Playwright cannot route (subresource redirect hops)."""
        if (lock := self._locks.get(page)) is None:
            lock = self._locks[page] = asyncio.ensure_future(self._lock(page))
        await asyncio.shield(lock)

    async def _lock(self, page: Page) -> None:
        try:
            session = await page.context.new_cdp_session(page)
            await session.send("Network.enable")
            await self._block(session)
        except PlaywrightError as err:  # an older Chromium, or a popup already closed
            self.log.warning("guard.page_lock_failed", error=first_line(err))
            return
        self._sessions[page] = session

    async def _block(self, session: CDPSession) -> None:
        """Everything but the hosts allowed now is blocked, redirect hops included."""
        allow = [{"urlPattern": f"*://{pattern_host(h)}:*/*", "block": False} for h in self.allowed]
        block = [
            {"urlPattern": f"{s}://*:*/*", "block": True} for s in ("http", "https", "ws", "wss")
        ]
        await session.send("Network.setBlockedURLs", {"urlPatterns": allow + block})

    def _on_revoked(self, host: str) -> None:
        """A host left the allowed set: routed requests see it at once (``allows``); the
        page locks and open sockets follow here."""
        self.log.info("guard.host_revoked", host=host)
        chore = asyncio.ensure_future(self._revoke(host))
        self._chores.add(chore)
        chore.add_done_callback(self._chores.discard)

    async def _revoke(self, host: str) -> None:
        for entry in [e for e in self._sockets if e[0] == host]:
            self._sockets.discard(entry)
            _, page_side, server_side = entry
            with contextlib.suppress(PlaywrightError):
                await page_side.close(code=1008, reason=REVOKED)
                await server_side.close(code=1008, reason=REVOKED)
        for page, lock in list(self._locks.items()):
            await asyncio.shield(lock)
            session = self._sessions.get(page)
            if session is not None:
                with contextlib.suppress(PlaywrightError):  # the page closed meanwhile
                    await self._block(session)

    async def report_unauthorised(self, url: str) -> None:
        """Record a link or navigation to an unauthorised host, once per URL and flow."""
        if url in self._reported:
            return
        self._reported.add(url)
        await self.report.click_skipped(url, UNAUTHORISED_HOST)

    def forget_redirects(self, frame: Frame) -> None:
        self._redirects.pop(frame, None)

    async def follow_redirects(self, frame: Frame, failure: PlaywrightError) -> Response | None:
        """After a navigation of ``frame`` failed: the response at the end of the redirect
        chain the guard is following for it, else ``failure`` again."""
        while (task := self._redirects.pop(frame, None)) is not None:
            try:
                return await task
            except PlaywrightError as err:  # redirected once more, or really failed
                failure = err
        raise failure

    async def release(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        pending: list[asyncio.Future[Any]] = [*self._tasks, *self._locks.values(), *self._chores]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _on_request(self, route: Route, request: Request) -> None:
        url = request.url
        navigation = request.is_navigation_request()
        try:
            if scheme_of(url) in INERT_SCHEMES:
                await route.continue_()
            elif not self.allows(url):
                await route.abort(abort_code(request))
                if navigation:
                    await self._refuse(url)
            elif navigation:
                await self._navigate(route, request)
            else:
                await route.continue_()
        except PlaywrightError as err:  # the page or context closed under the request
            self.log.debug("guard.route_closed", url=url, error=first_line(err))

    async def _navigate(self, route: Route, request: Request) -> None:
        frame = frame_of(request)
        if frame is None and request.method == "GET":
            # A popup's first request comes before its page exists, so the page cannot be
            # locked in time: the popup opens blank and navigates once it is locked.
            self._popups.append((request.url, request.headers.get("referer")))
            await route.fulfill(status=200, content_type="text/html", body="")
            return
        try:
            response = await route.fetch(max_redirects=0, timeout=NAVIGATION_TIMEOUT_MS)
        except PlaywrightError as err:
            self.log.info("guard.fetch_failed", url=request.url, error=first_line(err))
            await route.abort(network_error_code(str(err)))
            return
        location = response.headers.get("location")
        if response.status not in REDIRECT_STATUSES or not location:
            if frame is not None:
                self._hops.pop(frame, None)
            await route.fulfill(response=response)
            await response.dispose()
            return
        await response.dispose()
        target = urljoin(request.url, location)
        if not self.allows(target):
            await route.abort(abort_code(request))
            await self._refuse(target)
            return
        hops = self._hops.get(frame, 0) + 1 if frame is not None else 0
        replayable = request.method == "GET" or response.status not in {307, 308}
        if frame is None or hops > MAX_REDIRECTS or not replayable:
            self.log.info("guard.redirect_not_followed", url=request.url, target=target, hops=hops)
            await route.abort("failed")
            return
        self._hops[frame] = hops
        # Registered before the abort, so whoever sees this navigation fail finds its
        # continuation; the new navigation goes through this guard again.
        self._redirect(frame, target, request.headers.get("referer"))
        with contextlib.suppress(PlaywrightError):  # the new navigation may have won
            await route.abort("aborted")

    def _redirect(self, frame: Frame, target: str, referer: str | None) -> None:
        self._redirects[frame] = self._spawn(
            frame.goto(
                target,
                referer=referer,
                wait_until="domcontentloaded",
                timeout=NAVIGATION_TIMEOUT_MS,
            )
        )

    async def _on_page(self, page: Page) -> None:
        await self.lock_page(page)
        if self._popups:
            url, referer = self._popups.popleft()
            self._spawn(
                page.goto(
                    url,
                    referer=referer,
                    wait_until="domcontentloaded",
                    timeout=NAVIGATION_TIMEOUT_MS,
                )
            )

    def _spawn(self, navigation: Awaitable[Response | None]) -> asyncio.Task[Response | None]:
        task = asyncio.ensure_future(navigation)
        self._tasks.add(task)
        task.add_done_callback(self._navigation_done)
        return task

    def _navigation_done(self, task: asyncio.Task[Response | None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            self.log.debug("guard.navigation_ended", error=first_line(err))

    async def _refuse(self, url: str) -> None:
        self.refused.append(url)
        self.log.info("guard.navigation_refused", url=url)
        await self.report_unauthorised(url)

    async def _on_web_socket(self, socket: WebSocketRoute) -> None:
        if self.allows(socket.url, SOCKET_SCHEMES):
            host = host_of(socket.url)
            server = socket.connect_to_server()

            def forward(message: str | bytes) -> None:
                # checked per frame: a revoked host gets nothing more, even before the
                # sockets are closed
                if host in self.hosts:
                    server.send(message)

            socket.on_message(forward)
            self._sockets.add((host, socket, server))
        else:
            self.log.info("guard.socket_refused", url=socket.url)
            await socket.close(code=1008, reason=UNAUTHORISED_HOST)


def pattern_host(host: str) -> str:
    return f"\\[{host}\\]" if ":" in host else host  # IPv6 literals are bracketed in URLs


def frame_of(request: Request) -> Frame | None:
    try:
        return request.frame
    except PlaywrightError:  # a popup's first request precedes its frame; workers have none
        return None


def abort_code(request: Request) -> str:
    # "aborted" leaves the current document in place, so a refused top-level
    # navigation does not strand the flow on an error page.
    if not request.is_navigation_request():
        return "blockedbyclient"
    frame = frame_of(request)
    return "aborted" if frame is None or frame.parent_frame is None else "blockedbyclient"


def network_error_code(message: str) -> str:
    """Map a failed ``route.fetch`` onto the browser error the page would have seen."""
    for marker, code in (
        ("ECONNREFUSED", "connectionrefused"),
        ("ENOTFOUND", "namenotresolved"),
        ("EAI_AGAIN", "namenotresolved"),
        ("ECONNRESET", "connectionreset"),
        ("ETIMEDOUT", "timedout"),
        ("Timeout", "timedout"),
    ):
        if marker in message:
            return code
    return "failed"
