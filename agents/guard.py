"""Records where a flow's browser was kept from going (DESIGN invariant 4).

The network layer holds egress: every connection of the flow's browser context goes
through the runner's egress proxy (``agents.egress``), which admits only the flow's
consented host:port pairs. This guard is the second layer, in the browser: Playwright
routing aborts a routed request to another host before it reaches the proxy, and a
navigation that leaves the authorised hosts (by a link, a script, a form or a
redirect hop, which routing never sees) is recorded as ``ClickSkipped`` so the flow
knows it was refused and can stay where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from urllib.parse import urlsplit

import structlog
from playwright.async_api import BrowserContext, Page, Request, Response, Route
from playwright.async_api import Error as PlaywrightError
from structlog.typing import FilteringBoundLogger

from agents.browser import first_line
from agents.egress.proxy import REFUSAL_HEADER
from agents.executor import AllowedHosts, FlowReport

log = structlog.get_logger("tb.agent")

UNAUTHORISED_HOST = "unauthorised_host"
WEB_SCHEMES = frozenset({"http", "https"})
INERT_SCHEMES = frozenset({"data", "blob", "about"})
NAVIGATION_TIMEOUT_MS = 30_000


class GuardFailed(Exception):
    """The guard could not be set up: the flow must not run (it fails closed)."""


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:  # e.g. a malformed IPv6 literal: matches no allowed host
        return ""


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


class HostGuard:
    """The browser-side record of one flow's refused navigations and requests."""

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
        # top-level navigations refused, in order, per page (None: a popup not yet open)
        self._refused: dict[Page | None, list[str]] = {}
        self._reported: set[str] = set()
        # each page prepared once: the flow's own page is prepared both by the executor
        # (before it navigates) and by the context's page event; they share one call
        self._preparing: dict[Page, asyncio.Future[None]] = {}

    @property
    def allowed(self) -> frozenset[str]:
        """The hosts allowed now: a revoked one has left the set."""
        return self.hosts.current

    def allows(self, url: str, schemes: frozenset[str] = WEB_SCHEMES) -> bool:
        return scheme_of(url) in schemes and host_of(url) in self.allowed

    async def install(self, context: BrowserContext) -> None:
        """Route the context's requests through this guard; raises ``GuardFailed``."""
        try:
            await context.route("**/*", self._on_request)
        except PlaywrightError as err:
            raise GuardFailed(f"routing not installed: {first_line(err)}") from err
        context.on("request", self._on_any_request)
        context.on("page", self._on_page)

    async def prepare(self, page: Page) -> None:
        """Before ``page`` loads anything: no prerendering from it (the browser process
        would load those pages without the job's header). Raises ``GuardFailed``."""
        preparing = self._preparing.get(page)
        if preparing is None:
            preparing = self._preparing[page] = asyncio.ensure_future(self._prepare(page))
        await asyncio.shield(preparing)

    async def _prepare(self, page: Page) -> None:
        try:
            # the setting lasts as long as the DevTools session: it stays open with the page
            session = await page.context.new_cdp_session(page)
            await session.send("Page.setPrerenderingAllowed", {"isAllowed": False})
        except PlaywrightError as err:
            raise GuardFailed(f"DevTools call failed: {first_line(err)}") from err

    async def _on_page(self, page: Page) -> None:
        """A popup: prepared like the flow's page, or closed."""
        try:
            await self.prepare(page)
        except GuardFailed as err:
            self.log.warning("guard.popup_closed", error=str(err))
            with contextlib.suppress(PlaywrightError):
                await page.close()

    def refused(self, page: Page) -> list[str]:
        """The navigations of ``page`` itself (not of its frames) that were refused."""
        return self._refused.get(page, [])

    async def report_unauthorised(self, url: str) -> None:
        """Record a link or navigation to an unauthorised host, once per URL and flow."""
        if url in self._reported:
            return
        self._reported.add(url)
        await self.report.click_skipped(url, UNAUTHORISED_HOST)

    async def _on_request(self, route: Route, request: Request) -> None:
        url = request.url
        try:
            if scheme_of(url) in INERT_SCHEMES or self.allows(url):
                await route.continue_()
                return
            # "aborted" leaves the current document in place, so a refused top-level
            # navigation does not strand the flow on an error page
            await route.abort("aborted" if request.is_navigation_request() else "blockedbyclient")
        except PlaywrightError as err:  # the page or context closed under the request
            self.log.debug("guard.route_closed", url=url, error=first_line(err))

    async def _on_any_request(self, request: Request) -> None:
        # Every navigation is seen here, redirect hops too (which are never routed: the
        # egress proxy refuses an unauthorised one); a refused one is recorded.
        if not request.is_navigation_request():
            return
        url = request.url
        if scheme_of(url) not in INERT_SCHEMES and not self.allows(url):
            await self._refuse(request)

    async def _refuse(self, request: Request) -> None:
        url = request.url
        try:
            frame = request.frame
            if frame.parent_frame is None:
                self._refused.setdefault(frame.page, []).append(url)
        except PlaywrightError:  # a popup's first request precedes its frame
            self._refused.setdefault(None, []).append(url)
        self.log.info("guard.navigation_refused", url=url)
        await self.report_unauthorised(url)


def egress_refusal(response: Response | None) -> str | None:
    """Why the egress proxy refused a navigation, when its answer is what came back."""
    if response is None:
        return None
    return response.headers.get(REFUSAL_HEADER.lower())
