"""The flow executor port and its Playwright implementation.

A flow is one browser session against one target: land, dwell and scroll, follow
internal links. Each flow gets its own browser context whose every request carries
the job header and the TrafficBuster User-Agent (DESIGN invariant 5) and is held
to the flow's ``allowed_hosts`` by a ``HostGuard`` (invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol
from urllib.parse import urldefrag, urljoin, urlsplit

import structlog
from playwright.async_api import (
    Browser,
    BrowserContext,
    Frame,
    Page,
    Playwright,
    Request,
    Response,
    Route,
    WebSocketRoute,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError
from structlog.typing import FilteringBoundLogger

from agents.browser import first_line, launch_chromium
from schemas.events import FlowDispatched

log = structlog.get_logger("tb.agent")

JOB_HEADER = "X-TrafficBuster"
NAVIGATION_TIMEOUT_MS = 30_000
CLICK_TIMEOUT_MS = 5_000
SCREENSHOT_TIMEOUT_MS = 5_000
KEEPALIVE_SECONDS = 1.5
MAX_PAUSE_SECONDS = 0.4
MAX_REDIRECTS = 20
UNAUTHORISED_HOST = "unauthorised_host"

WEB_SCHEMES = frozenset({"http", "https"})
SOCKET_SCHEMES = frozenset({"ws", "wss"})
# The guard serves navigations with route.fulfill, and Chromium gives a fulfilled
# document no IP address space, so Local Network Access would refuse its requests to
# private and loopback hosts (intranet targets, the demo site). The guard already
# confines every flow to its authorised hosts, so flows get the permission.
LOCAL_NETWORK = ["local-network-access"]
INERT_SCHEMES = frozenset({"data", "blob", "about"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
LINKS_JS = "els => els.map(e => (typeof e.href === 'string' ? e.href : ''))"


# -- the port -----------------------------------------------------------------------


class FlowReport(Protocol):
    """Where an executor reports progress; the runner turns calls into flow events.

    Calls may overlap: the guard reports refused navigations from Playwright's route
    handler while the flow is navigating, and keepalives come from a timer.
    """

    async def page_visited(self, url: str, status: int | None) -> None: ...

    async def click_done(self, href: str) -> None: ...

    async def click_skipped(self, href: str, reason: str) -> None: ...

    async def keepalive(self) -> None:
        """Called at least every ~2 s while a flow runs (the runner's in-progress ack)."""
        ...


@dataclass(frozen=True)
class FlowResult:
    clicks_done: int
    pages: int


class FlowError(Exception):
    """A flow that did not complete; ``retryable`` tells the runner whether to redispatch."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.screenshot: str | None = None  # local PNG path, when one was taken


class FlowExecutor(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def run(self, item: FlowDispatched, report: FlowReport) -> FlowResult: ...


class NoopExecutor:
    """Completes every flow at once without a browser (engine benchmarks)."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, item: FlowDispatched, report: FlowReport) -> FlowResult:
        return FlowResult(clicks_done=item.clicks, pages=1)


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
    Subresource redirect hops cannot be re-issued; a DevTools URL allowlist on the
    flow's page blocks those. WebSockets bypass routing and have their own check.
    """

    def __init__(
        self, allowed_hosts: Iterable[str], report: FlowReport, flog: FilteringBoundLogger
    ) -> None:
        self.allowed = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self.report = report
        self.log = flog
        self.refused: list[str] = []  # navigations refused, in order
        self._reported: set[str] = set()
        self._redirects: dict[Frame, asyncio.Task[Response | None]] = {}
        self._hops: dict[Frame, int] = {}
        self._tasks: set[asyncio.Task[Response | None]] = set()

    def allows(self, url: str, schemes: frozenset[str] = WEB_SCHEMES) -> bool:
        return scheme_of(url) in schemes and host_of(url) in self.allowed

    async def install(self, context: BrowserContext) -> None:
        await context.route("**/*", self._on_request)
        await context.route_web_socket(lambda _url: True, self._on_web_socket)

    async def lock_page(self, context: BrowserContext, page: Page) -> None:
        """Block the page's requests Playwright cannot route (subresource redirect hops)."""
        allow = [{"urlPattern": f"*://{pattern_host(h)}:*/*", "block": False} for h in self.allowed]
        block = [
            {"urlPattern": f"{s}://*:*/*", "block": True} for s in ("http", "https", "ws", "wss")
        ]
        try:
            session = await context.new_cdp_session(page)
            await session.send("Network.enable")
            await session.send("Network.setBlockedURLs", {"urlPatterns": allow + block})
        except PlaywrightError as err:  # an older Chromium: routing alone still holds
            self.log.warning("guard.hop_block_unavailable", error=first_line(err))

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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
        try:
            response = await route.fetch(max_redirects=0, timeout=NAVIGATION_TIMEOUT_MS)
        except PlaywrightError as err:
            self.log.info("guard.fetch_failed", url=request.url, error=first_line(err))
            await route.abort(network_error_code(str(err)))
            return
        frame = request.frame
        location = response.headers.get("location")
        if response.status not in REDIRECT_STATUSES or not location:
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
        hops = self._hops.get(frame, 0) + 1
        if hops > MAX_REDIRECTS or (request.method != "GET" and response.status in {307, 308}):
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
        goto = frame.goto(
            target, referer=referer, wait_until="domcontentloaded", timeout=NAVIGATION_TIMEOUT_MS
        )
        task = asyncio.ensure_future(goto)
        self._redirects[frame] = task
        self._tasks.add(task)
        task.add_done_callback(self._redirect_done)

    def _redirect_done(self, task: asyncio.Task[Response | None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            self.log.debug("guard.redirect_ended", error=first_line(err))

    async def _refuse(self, url: str) -> None:
        self.refused.append(url)
        self.log.info("guard.navigation_refused", url=url)
        await self.report_unauthorised(url)

    async def _on_web_socket(self, socket: WebSocketRoute) -> None:
        if self.allows(socket.url, SOCKET_SCHEMES):
            socket.connect_to_server()
        else:
            self.log.info("guard.socket_refused", url=socket.url)
            await socket.close(code=1008, reason=UNAUTHORISED_HOST)


def pattern_host(host: str) -> str:
    return f"\\[{host}\\]" if ":" in host else host  # IPv6 literals are bracketed in URLs


def abort_code(request: Request) -> str:
    # "aborted" leaves the current document in place, so a refused top-level
    # navigation does not strand the flow on an error page.
    try:
        main_frame = request.frame.parent_frame is None
    except PlaywrightError:  # a worker's request has no frame
        main_frame = False
    return "aborted" if main_frame and request.is_navigation_request() else "blockedbyclient"


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


# -- one flow -----------------------------------------------------------------------


class ClickOutcome(Enum):
    DONE = "done"
    REFUSED = "refused"  # the navigation left the authorised hosts: reported, not followed
    NO_LINK = "no_link"
    FAILED = "failed"


class FlowSession:
    """One flow's journey on one page: land, dwell and scroll, follow internal links."""

    def __init__(
        self,
        page: Page,
        guard: HostGuard,
        item: FlowDispatched,
        report: FlowReport,
        flog: FilteringBoundLogger,
    ) -> None:
        self.page, self.guard, self.item, self.report, self.log = page, guard, item, report, flog
        rng = random.Random(item.seed)
        # Two streams: how many scroll steps fit in a dwell depends on timing, which
        # must not shift the choice of links.
        self.link_rng = random.Random(rng.getrandbits(64))
        self.scroll_rng = random.Random(rng.getrandbits(64))

    async def run(self) -> FlowResult:
        await self.land()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.item.session_seconds
        clicks = 0
        for step in range(self.item.clicks):
            pages_left = self.item.clicks - step + 1
            await self.dwell(until=loop.time() + (deadline - loop.time()) / pages_left)
            outcome = await self.click_step()
            if outcome is ClickOutcome.DONE:
                clicks += 1
            elif outcome is not ClickOutcome.REFUSED:
                break
        await self.dwell(until=deadline)
        return FlowResult(clicks_done=clicks, pages=clicks + 1)

    async def land(self) -> None:
        url, referrer = self.item.url, self.item.referrer
        # a referrer may be a source label rather than a URL; only a URL makes a Referer
        referer = referrer if referrer and scheme_of(referrer) in WEB_SCHEMES else None
        try:
            status = await self.navigate(
                lambda: self.page.goto(
                    url,
                    referer=referer,
                    wait_until="domcontentloaded",
                    timeout=NAVIGATION_TIMEOUT_MS,
                )
            )
        except PlaywrightError as err:
            if self.guard.refused:
                raise FlowError(f"{UNAUTHORISED_HOST}: {self.guard.refused[-1]}", False) from err
            raise FlowError(f"navigation_failed: {first_line(err)}", retryable=True) from err
        if status is not None and status >= 400:
            raise FlowError(f"http_{status}", retryable=status >= 500)
        await self.report.page_visited(self.page.url, status)

    async def navigate(self, start: Callable[[], Awaitable[Response | None]]) -> int | None:
        """Run a main-frame navigation through to the end of any redirects the guard follows."""
        frame = self.page.main_frame
        self.guard.forget_redirects(frame)
        try:
            response = await start()
        except PlaywrightError as err:
            response = await self.guard.follow_redirects(frame, err)
        return response.status if response is not None else None

    async def dwell(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while (left := until - loop.time()) > 0:
            await self.page.mouse.wheel(0, self.scroll_rng.randint(-240, 720))
            await asyncio.sleep(min(left, self.scroll_rng.uniform(0.05, MAX_PAUSE_SECONDS)))

    async def click_step(self) -> ClickOutcome:
        internal, external = await self.links()
        if external:
            await self.guard.report_unauthorised(self.link_rng.choice(external))
        if not internal:
            return ClickOutcome.NO_LINK
        index, href = self.link_rng.choice(internal)
        refused_before = len(self.guard.refused)
        try:
            status = await self.navigate(lambda: self.follow(index, href))
        except PlaywrightError as err:
            if len(self.guard.refused) > refused_before:
                return ClickOutcome.REFUSED
            self.log.info("flow.click_failed", href=href, error=first_line(err))
            return ClickOutcome.FAILED
        await self.report.click_done(href)
        await self.report.page_visited(self.page.url, status)
        return ClickOutcome.DONE

    async def links(self) -> tuple[list[tuple[int, str]], list[str]]:
        """Internal links (index among ``a[href]``, href) and external hrefs, in page order."""
        hrefs: list[str] = await self.page.eval_on_selector_all("a[href]", LINKS_JS)
        here = self.page.url
        current, seen = urldefrag(here).url, {urldefrag(here).url}
        internal: list[tuple[int, str]] = []
        external: list[str] = []
        for index, href in enumerate(hrefs):
            if scheme_of(href) not in WEB_SCHEMES or urldefrag(href).url in seen:
                continue
            seen.add(urldefrag(href).url)
            if not self.guard.allows(href):
                external.append(href)
            elif host_of(href) == host_of(current):
                internal.append((index, href))
        return internal, external

    async def follow(self, index: int, href: str) -> Response | None:
        link = self.page.locator("a[href]").nth(index)
        if not await link.is_visible():
            return await self.page.goto(
                href, wait_until="domcontentloaded", timeout=NAVIGATION_TIMEOUT_MS
            )
        await link.evaluate("a => a.removeAttribute('target')")  # stay in this tab
        async with self.page.expect_navigation(
            wait_until="domcontentloaded", timeout=NAVIGATION_TIMEOUT_MS
        ) as navigation:
            await link.click(timeout=CLICK_TIMEOUT_MS)
        return await navigation.value


# -- the executor -------------------------------------------------------------------


class PlaywrightExecutor:
    """Runs flows in one Chromium, one fresh browser context per flow (safe to run
    several flows at once)."""

    def __init__(self, version: str, headless: bool = True, screenshot_dir: Path | None = None):
        self.version = version
        self.headless = headless
        self.screenshot_dir = screenshot_dir
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._user_agent = ""
        self._permissions: list[str] = []

    async def start(self) -> None:
        if self._browser is not None:
            return
        playwright = await async_playwright().start()
        try:
            browser = await launch_chromium(playwright, headless=self.headless)
            default_agent, self._permissions = await probe_browser(browser)
        except BaseException:
            await playwright.stop()
            raise
        self._playwright, self._browser = playwright, browser
        self._user_agent = f"{default_agent} TrafficBuster/{self.version}"
        log.info("executor.started", browser=browser.version, user_agent=self._user_agent)

    async def close(self) -> None:
        browser, playwright = self._browser, self._playwright
        self._browser = self._playwright = None
        if browser is not None:
            with contextlib.suppress(PlaywrightError):
                await browser.close()
        if playwright is not None:
            await playwright.stop()

    async def run(self, item: FlowDispatched, report: FlowReport) -> FlowResult:
        if self._browser is None:
            raise RuntimeError("PlaywrightExecutor.run() before start()")
        flog = log.bind(job_id=item.job_id, flow_id=item.flow_id, attempt=item.attempt)
        keepalive = asyncio.create_task(keep_alive(report), name=f"keepalive-{item.flow_id}")
        try:
            context = await self._browser.new_context(
                user_agent=self._user_agent,
                extra_http_headers={JOB_HEADER: item.job_id},
                viewport={"width": 1280, "height": 800},
                service_workers="block",
                permissions=self._permissions,
            )
        except PlaywrightError as err:
            await stop_keepalive(keepalive, flog)
            raise FlowError(f"browser_error: {first_line(err)}") from err
        guard = HostGuard(item.allowed_hosts, report, flog)
        page: Page | None = None
        try:
            await guard.install(context)
            page = await context.new_page()
            await guard.lock_page(context, page)
            return await FlowSession(page, guard, item, report, flog).run()
        except FlowError as err:
            err.screenshot = await self._screenshot(page, item, flog)
            raise
        except PlaywrightError as err:
            failure = FlowError(f"browser_error: {first_line(err)}")
            failure.screenshot = await self._screenshot(page, item, flog)
            raise failure from err
        finally:
            await stop_keepalive(keepalive, flog)
            await guard.release()
            with contextlib.suppress(PlaywrightError):
                await context.close()

    async def _screenshot(
        self, page: Page | None, item: FlowDispatched, flog: FilteringBoundLogger
    ) -> str | None:
        if self.screenshot_dir is None or page is None:
            return None
        path = self.screenshot_dir / f"{item.flow_id}-{item.attempt}.png"
        try:
            await page.screenshot(path=path, timeout=SCREENSHOT_TIMEOUT_MS)
        except PlaywrightError as err:
            flog.warning("flow.screenshot_failed", error=first_line(err))
            return None
        return str(path)


async def probe_browser(browser: Browser) -> tuple[str, list[str]]:
    """The browser's own User-Agent, and the flow context permissions it accepts."""
    try:
        context = await browser.new_context(permissions=LOCAL_NETWORK)
        permissions = LOCAL_NETWORK
    except PlaywrightError as err:  # a Playwright that does not know the permission yet
        log.warning("executor.no_local_network_permission", error=first_line(err))
        context, permissions = await browser.new_context(), []
    try:
        page = await context.new_page()
        return str(await page.evaluate("navigator.userAgent")), permissions
    finally:
        await context.close()


async def keep_alive(report: FlowReport) -> None:
    while True:
        await report.keepalive()
        await asyncio.sleep(KEEPALIVE_SECONDS)


async def stop_keepalive(task: asyncio.Task[None], flog: FilteringBoundLogger) -> None:
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(outcome, Exception):
        flog.warning("flow.keepalive_failed", error=str(outcome))
