"""The Playwright implementation of the executor port.

A flow is one browser session against one target: land, dwell and scroll, follow
internal links. Each flow gets its own browser context whose every request carries
the job header and the TrafficBuster User-Agent (DESIGN invariant 5). The context
sends everything through the runner's egress proxy with the flow's own credentials,
which admits only the flow's consented host:port pairs (invariant 4); a ``HostGuard``
records refused navigations in the browser. A guard that cannot be set up fails the
flow (reason ``guard``): it never runs unguarded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from enum import Enum
from urllib.parse import urldefrag

import structlog
from playwright.async_api import (
    Browser,
    Page,
    Playwright,
    ProxySettings,
    Response,
    async_playwright,
)
from playwright.async_api import Error as PlaywrightError
from structlog.typing import FilteringBoundLogger

from agents.behaviour import FlowPlan, Leave, pick_index, plan_for
from agents.browser import first_line, launch_chromium
from agents.device_context import context_options, device_for, identified
from agents.egress.flow import FlowEgressReport, consented_ports
from agents.egress.proxy import EgressProxy, FlowEgress
from agents.executor import AllowedHosts, FlowError, FlowReport, FlowResult
from agents.guard import (
    NAVIGATION_TIMEOUT_MS,
    UNAUTHORISED_HOST,
    WEB_SCHEMES,
    GuardFailed,
    HostGuard,
    egress_refusal,
    host_of,
    scheme_of,
)
from agents.human import PageTrail, Surfer
from agents.page_metrics import arrival_timings, read_timings, watch_vitals
from agents.proxy_failover import FlowProxies, SecretSource
from schemas.device_catalogue import ShippedCatalogues
from schemas.devices import Viewport
from schemas.events import FlowDispatched, LinkPick

log = structlog.get_logger("tb.agent")

JOB_HEADER = "X-TrafficBuster"
FLOW_HEADER = "X-TrafficBuster-Flow"  # lets a site count concurrent sessions
CLICK_TIMEOUT_MS = 5_000
SCREENSHOT_TIMEOUT_MS = 5_000
KEEPALIVE_SECONDS = 1.5
LINKS_JS = "els => els.map(e => (typeof e.href === 'string' ? e.href : ''))"

# -- one flow -----------------------------------------------------------------------


class ClickOutcome(Enum):
    DONE = "done"
    REFUSED = "refused"  # the navigation left the authorised hosts: reported, not followed
    NO_LINK = "no_link"
    FAILED = "failed"


class FlowSession:
    """One flow's journey, as its plan says (``agents.behaviour``): land, browse each
    page (scroll steps, mouse paths, dwell), leave it by the planned link."""

    def __init__(
        self,
        page: Page,
        guard: HostGuard,
        item: FlowDispatched,
        report: FlowReport,
        flog: FilteringBoundLogger,
        plan: FlowPlan,
        viewport: Viewport,
    ) -> None:
        self.page, self.guard, self.item, self.report, self.log = page, guard, item, report, flog
        self.egress_refusal: str | None = None  # why the proxy refused the last navigation
        self.plan = plan
        self.surfer = Surfer(page, viewport)
        self.trail = PageTrail()  # what the flow did on the page it is on
        self.status: int | None = None  # that page's HTTP status
        self.picked: tuple[str, LinkPick] | None = None  # the link the last leave took

    @property
    def refused(self) -> list[str]:
        """Navigations of the flow's page that left the authorised hosts."""
        return self.guard.refused(self.page)

    async def run(self) -> FlowResult:
        loop = asyncio.get_running_loop()
        clicks = pages = 0
        await self.land()
        arrived = page_start = loop.time()
        await self.arrived()
        stuck = False  # no way off the page: the rest of the session is spent on it
        for plan in self.plan.pages:
            await self.surfer.browse(plan, arrived, self.trail)
            arrived += plan.dwell
            if plan.leave is None or stuck:
                continue
            here, timings = self.page.url, await read_timings(self.page)
            outcome = await self.leave(plan.leave)
            if outcome is ClickOutcome.DONE and self.picked is not None:
                pages += 1
                self.trail.dwell_ms = round((loop.time() - page_start) * 1000)
                await self.report.page_left(here, self.trail, timings)
                self.trail = PageTrail()
                if plan.leave.click:
                    clicks += 1
                    await self.report.click_done(*self.picked)
                arrived = page_start = loop.time()
                await self.arrived()
            stuck = outcome in (ClickOutcome.NO_LINK, ClickOutcome.FAILED)
        self.trail.dwell_ms = round((loop.time() - page_start) * 1000)
        await self.report.page_left(self.page.url, self.trail, await read_timings(self.page))
        return FlowResult(
            clicks_done=clicks,
            pages=pages + 1,
            device=self.plan.device.name,
            delay_ms=round(self.plan.delay * 1000),
        )

    async def arrived(self) -> None:
        timings = await arrival_timings(self.page)
        await self.report.page_visited(self.page.url, self.status, timings)

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
            if self.refused:
                raise FlowError(f"{UNAUTHORISED_HOST}: {self.refused[-1]}", False) from err
            raise FlowError(f"navigation_failed: {first_line(err)}", retryable=True) from err
        if not self.guard.allows(self.page.url):  # a redirect hop left: the proxy refused it
            raise FlowError(f"{UNAUTHORISED_HOST}: {self.page.url}", False)
        if self.egress_refusal:  # e.g. a port, or an address the host map gives, not consented
            raise FlowError(f"egress_refused: {self.egress_refusal}", False)
        if status is not None and status >= 400:
            raise FlowError(f"http_{status}", retryable=status >= 500)
        self.status = status

    async def navigate(self, start: Callable[[], Awaitable[Response | None]]) -> int | None:
        """Run a main-frame navigation (Chromium follows its redirects itself)."""
        response = await start()
        self.egress_refusal = egress_refusal(response)
        return response.status if response is not None else None

    async def leave(self, leave: Leave) -> ClickOutcome:
        """Leave the page by the link ``leave`` picks: a click, or opening it directly."""
        internal, external, unauthorised = await self.links()
        if unauthorised:
            await self.guard.report_unauthorised(
                unauthorised[pick_index(leave.pick, len(unauthorised))]
            )
        outside = leave.external and bool(external)  # no other consented host linked: stay
        candidates = external if outside else internal
        if not candidates:
            return ClickOutcome.NO_LINK
        picked = pick_index(leave.pick, len(candidates))
        index, href = candidates[picked]
        link = LinkPick(index=picked, candidates=len(candidates), external=outside)
        self.picked = (href, link)
        refused_before = len(self.refused)
        here = self.page.url
        try:
            if leave.click:
                self.status = await self.navigate(lambda: self.follow(index, href, leave))
            else:
                self.status = await self.navigate(lambda: self.open(href))
        except PlaywrightError as err:
            if len(self.refused) > refused_before:
                await self.stay(here)
                return ClickOutcome.REFUSED
            self.log.info("flow.click_failed", href=href, error=first_line(err))
            return ClickOutcome.FAILED
        if not self.guard.allows(self.page.url) or self.egress_refusal:
            await self.stay(here)  # the proxy refused the page (or a redirect hop): no page
            return ClickOutcome.REFUSED
        return ClickOutcome.DONE

    async def stay(self, here: str) -> None:
        """Back on ``here`` after a refused navigation left the page elsewhere."""
        if self.page.url != here:
            await self.page.goto(here, wait_until="domcontentloaded", timeout=NAVIGATION_TIMEOUT_MS)

    async def links(
        self,
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[str]]:
        """Links to follow, each ``(index among a[href], href)`` in page order: to this
        page's host, and to another host the flow may visit; and hrefs it may not."""
        hrefs: list[str] = await self.page.eval_on_selector_all("a[href]", LINKS_JS)
        here = self.page.url
        seen = {urldefrag(here).url}  # links back to this page are no click
        internal: list[tuple[int, str]] = []
        external: list[tuple[int, str]] = []
        unauthorised: list[str] = []
        for index, href in enumerate(hrefs):
            if scheme_of(href) not in WEB_SCHEMES or urldefrag(href).url in seen:
                continue
            seen.add(urldefrag(href).url)
            if not self.guard.allows(href):
                unauthorised.append(href)
            elif host_of(href) == host_of(here):
                internal.append((index, href))
            else:
                external.append((index, href))
        return internal, external, unauthorised

    async def follow(self, index: int, href: str, leave: Leave) -> Response | None:
        link = self.page.locator("a[href]").nth(index)
        if not await link.is_visible():
            return await self.open(href)
        await link.evaluate("a => a.removeAttribute('target')")  # stay in this tab
        if self.plan.human_surfing:
            await self.surfer.point_at(link, leave)
        async with self.page.expect_navigation(
            wait_until="domcontentloaded", timeout=NAVIGATION_TIMEOUT_MS
        ) as navigation:
            await link.click(timeout=CLICK_TIMEOUT_MS)
        return await navigation.value

    async def open(self, href: str) -> Response | None:
        """Go to a link of the page without clicking it (a page beyond the clicks)."""
        return await self.page.goto(
            href,
            referer=self.page.url,
            wait_until="domcontentloaded",
            timeout=NAVIGATION_TIMEOUT_MS,
        )


# -- the executor -------------------------------------------------------------------

# Chromium's Local Network Access asks before a public page reaches private or loopback
# addresses; flows on intranet targets and the demo site need it, and the egress proxy
# already confines every flow to its consented host:port pairs.
LOCAL_NETWORK = ["local-network-access"]


class PlaywrightExecutor:
    """Runs flows in one Chromium, one fresh browser context per flow (safe to run
    several flows at once)."""

    def __init__(
        self,
        version: str,
        headless: bool = True,
        proxy_secrets: SecretSource | None = None,
        catalogues: ShippedCatalogues | None = None,
    ):
        self.version = version
        self.headless = headless
        # the device catalogue versions this runner can present a job's devices from
        self.catalogues = catalogues or ShippedCatalogues()
        # where flows' upstream proxies are looked up by id (None: flows with proxy
        # candidates fail closed, never run direct)
        self.proxy_secrets = proxy_secrets
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._user_agent = ""  # the browser's own, without the suffix
        self._permissions: list[str] = []
        self.egress = EgressProxy()

    async def start(self) -> None:
        if self._browser is not None:
            return
        await self.egress.start()
        playwright = await async_playwright().start()
        try:
            browser = await launch_chromium(playwright, headless=self.headless)
            default_agent, self._permissions = await probe_browser(browser)
        except BaseException:
            await playwright.stop()
            await self.egress.close()
            raise
        self._playwright, self._browser = playwright, browser
        self._user_agent = default_agent
        user_agent = identified(default_agent, self.version)
        log.info("executor.started", browser=browser.version, user_agent=user_agent)

    async def close(self) -> None:
        browser, playwright = self._browser, self._playwright
        self._browser = self._playwright = None
        if browser is not None:
            with contextlib.suppress(PlaywrightError):
                await browser.close()
        if playwright is not None:
            await playwright.stop()
        await self.egress.close()

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        if self._browser is None:
            raise RuntimeError("PlaywrightExecutor.run() before start()")
        flog = log.bind(job_id=item.job_id, flow_id=item.flow_id, attempt=item.attempt)
        plan = plan_for(item)
        device = device_for(item, plan.device, self.catalogues)
        await wait_keeping_alive(plan.delay, report)  # the traffic delay, before any browser
        hosts = hosts or AllowedHosts(item.allowed_hosts)
        egress = self._register(item, hosts, report, flog)
        try:
            context = await self._browser.new_context(
                **context_options(device, self._user_agent, self.version),
                extra_http_headers={JOB_HEADER: item.job_id, FLOW_HEADER: item.flow_id},
                service_workers="block",
                permissions=self._permissions,
                proxy=self.context_proxy(egress),
            )
        except PlaywrightError as err:
            self.egress.unregister(egress)
            raise FlowError(f"browser_error: {first_line(err)}") from err
        keepalive = asyncio.create_task(keep_alive(report), name=f"keepalive-{item.flow_id}")
        guard = HostGuard(hosts, report, flog)
        page: Page | None = None
        try:
            await watch_vitals(context)
            try:
                await guard.install(context)
                page = await context.new_page()
                await guard.prepare(page)
            except GuardFailed as err:
                raise FlowError(f"guard: {err}", retryable=True) from err
            session = FlowSession(page, guard, item, report, flog, plan, device.viewport)
            return await session.run()
        except FlowError as err:
            failure = proxies_exhausted(egress)
            if failure is None:
                err.screenshot = await self._screenshot(page, item, flog)
                raise
            failure.screenshot = await self._screenshot(page, item, flog)
            raise failure from err
        except PlaywrightError as err:
            failure = proxies_exhausted(egress) or FlowError(f"browser_error: {first_line(err)}")
            failure.screenshot = await self._screenshot(page, item, flog)
            raise failure from err
        finally:
            await stop_keepalive(keepalive, flog)
            with contextlib.suppress(PlaywrightError):
                await context.close()
            self.egress.unregister(egress)

    def _register(
        self,
        item: FlowDispatched,
        hosts: AllowedHosts,
        report: FlowReport,
        flog: FilteringBoundLogger,
    ) -> FlowEgress:
        """The flow's egress credentials; a proxy that is not there fails the flow closed."""
        if not self.egress.listening:
            raise FlowError("guard: egress proxy not listening", retryable=True)
        refusals = FlowEgressReport(report, flog)
        try:
            return self.egress.register(
                hosts,
                consented_ports(item),
                refusals.refused,
                host_map=self.host_map(item),
                proxies=self.proxies(item, report),
                label=f"{item.flow_id}:{item.attempt}",
            )
        except ValueError as err:
            raise FlowError(f"guard: {err}", retryable=False) from err

    def host_map(self, item: FlowDispatched) -> dict[str, str]:
        """The flow's DNS mode: a host->IP map the egress proxy applies (empty: the
        system resolver)."""
        return item.settings.host_map if item.settings is not None else {}

    def proxies(self, item: FlowDispatched, report: FlowReport) -> FlowProxies | None:
        """The upstream proxy candidates the flow's connections are chained through
        (None: they connect directly)."""
        if not item.proxies:
            return None
        if self.proxy_secrets is None:
            raise FlowError("guard: no proxy secrets to chain the flow's proxies", retryable=True)
        return FlowProxies.for_flow(item, self.proxy_secrets, report)

    def context_proxy(self, egress: FlowEgress) -> ProxySettings | None:
        """The browser context's proxy: the runner's egress proxy with the flow's
        credentials. (A benchmark measuring what the proxy costs overrides this.)"""
        return {"server": self.egress.url, "username": egress.username, "password": egress.password}

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


def proxies_exhausted(egress: FlowEgress) -> FlowError | None:
    """The flow's failure when every upstream proxy candidate failed: that, not what the
    page made of it, is why the flow did not complete (a retry gets fresh candidates)."""
    proxies = egress.proxies
    if proxies is None or not proxies.exhausted:
        return None
    return FlowError(f"proxy: all {len(proxies.candidates)} proxy candidates failed")


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


async def wait_keeping_alive(seconds: float, report: FlowReport) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        await asyncio.sleep(min(left, KEEPALIVE_SECONDS))
        await report.keepalive()


async def keep_alive(report: FlowReport) -> None:
    while True:
        await report.keepalive()
        await asyncio.sleep(KEEPALIVE_SECONDS)


async def stop_keepalive(task: asyncio.Task[None], flog: FilteringBoundLogger) -> None:
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(outcome, Exception):
        flog.warning("flow.keepalive_failed", error=str(outcome))
