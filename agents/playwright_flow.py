"""The Playwright implementation of the executor port.

A flow is one browser session against one target: land, dwell and scroll, follow
internal links. Each flow gets its own browser context whose every request carries
the job header and the TrafficBuster User-Agent (DESIGN invariant 5) and is held
to the flow's ``allowed_hosts`` by a ``HostGuard`` (invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from urllib.parse import urldefrag

import structlog
from playwright.async_api import (
    Browser,
    Page,
    Playwright,
    Response,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError
from structlog.typing import FilteringBoundLogger

from agents.browser import first_line, launch_chromium
from agents.executor import AllowedHosts, FlowError, FlowReport, FlowResult
from agents.guard import (
    NAVIGATION_TIMEOUT_MS,
    UNAUTHORISED_HOST,
    WEB_SCHEMES,
    HostGuard,
    host_of,
    scheme_of,
)
from schemas.events import FlowDispatched

log = structlog.get_logger("tb.agent")

JOB_HEADER = "X-TrafficBuster"
CLICK_TIMEOUT_MS = 5_000
SCREENSHOT_TIMEOUT_MS = 5_000
KEEPALIVE_SECONDS = 1.5
MAX_PAUSE_SECONDS = 0.4
LINKS_JS = "els => els.map(e => (typeof e.href === 'string' ? e.href : ''))"

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
        seen = {urldefrag(here).url}  # links back to this page are no click
        internal: list[tuple[int, str]] = []
        external: list[str] = []
        for index, href in enumerate(hrefs):
            if scheme_of(href) not in WEB_SCHEMES or urldefrag(href).url in seen:
                continue
            seen.add(urldefrag(href).url)
            if not self.guard.allows(href):
                external.append(href)
            elif host_of(href) == host_of(here):
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

# The guard serves navigations with route.fulfill, and Chromium gives a fulfilled
# document no IP address space, so Local Network Access would refuse its requests to
# private and loopback hosts (intranet targets, the demo site). The guard already
# confines every flow to its authorised hosts, so flows get the permission.
LOCAL_NETWORK = ["local-network-access"]


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

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        if self._browser is None:
            raise RuntimeError("PlaywrightExecutor.run() before start()")
        flog = log.bind(job_id=item.job_id, flow_id=item.flow_id, attempt=item.attempt)
        try:
            context = await self._browser.new_context(
                user_agent=self._user_agent,
                extra_http_headers={JOB_HEADER: item.job_id},
                viewport={"width": 1280, "height": 800},
                service_workers="block",
                permissions=self._permissions,
            )
        except PlaywrightError as err:
            raise FlowError(f"browser_error: {first_line(err)}") from err
        keepalive = asyncio.create_task(keep_alive(report), name=f"keepalive-{item.flow_id}")
        guard = HostGuard(hosts or AllowedHosts(item.allowed_hosts), report, flog)
        page: Page | None = None
        try:
            await guard.install(context)
            page = await context.new_page()
            await guard.lock_page(page)
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
    ) -> bytes | None:
        """The page as the flow failed, as PNG (the runner stores it in the object store)."""
        if page is None:
            return None
        try:
            return await page.screenshot(type="png", timeout=SCREENSHOT_TIMEOUT_MS)
        except PlaywrightError as err:
            flog.warning("flow.screenshot_failed", error=first_line(err))
            return None


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
