"""The flow executor port: what a runner asks of a browser, and a no-op for benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from agents.human import PageTrail
from schemas.events import FlowDispatched, LinkPick, PageTimings

log = structlog.get_logger("tb.agent")

# -- the port -----------------------------------------------------------------------


class FlowReport(Protocol):
    """Where an executor reports progress; the runner turns calls into flow events.

    Calls may overlap: the guard reports refused navigations from Playwright's route
    handler while the flow is navigating, and keepalives come from a timer.
    """

    async def page_visited(
        self, url: str, status: int | None, timings: PageTimings | None = None
    ) -> None: ...

    async def page_left(self, url: str, trail: PageTrail, timings: PageTimings | None) -> None:
        """The flow is done with a page: what it did there, what the browser measured."""
        ...

    async def click_done(self, href: str, link: LinkPick | None = None) -> None: ...

    async def click_skipped(self, href: str, reason: str) -> None: ...

    async def egress_refused(self, host: str, port: int, reason: str, request: str) -> None:
        """The egress proxy refused a connection the flow's browser asked for."""
        ...

    async def proxy_failed(self, proxy_id: str, proxy: str, error: str, reason: str) -> None:
        """An upstream proxy candidate failed (``proxy`` is its label, never its
        credentials); the flow goes on with the next one."""
        ...

    async def keepalive(self) -> None:
        """Called at least every ~2 s while a flow runs (the runner's in-progress ack)."""
        ...


def normal_host(host: str) -> str:
    return host.lower().rstrip(".")


class AllowedHosts:
    """The hosts one flow's browser may reach, kept live: a host whose consent is
    revoked leaves the set at once, and every watcher (the flow's guard) is told, so
    the browser sends nothing more to it while the rest of the flow goes on."""

    __slots__ = ("_hosts", "_watchers")

    def __init__(self, hosts: Iterable[str], *, normal: bool = False) -> None:
        """``normal``: the hosts are already lower case without a trailing dot."""
        self._hosts = frozenset(hosts) if normal else frozenset(normal_host(h) for h in hosts)
        self._watchers: list[Callable[[str], None]] = []

    @property
    def current(self) -> frozenset[str]:
        return self._hosts

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and normal_host(host) in self._hosts

    def revoke(self, host: str) -> None:
        host = normal_host(host)
        if host not in self._hosts:
            return
        self._hosts = self._hosts - {host}
        for watcher in list(self._watchers):
            watcher(host)

    def watch(self, watcher: Callable[[str], None]) -> Callable[[], None]:
        """Call ``watcher(host)`` on each revocation; returns the way to stop watching."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch


@dataclass(frozen=True)
class FlowResult:
    clicks_done: int
    pages: int
    device: str | None = None  # the device profile the flow presented as
    delay_ms: int | None = None  # the traffic delay it waited first


class FlowError(Exception):
    """A flow that did not complete; ``retryable`` tells the runner whether to redispatch."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.screenshot: bytes | None = None  # a PNG of the page as it failed, if taken


class FlowExecutor(Protocol):
    """Runs flows; ``run`` may be called for several flows at once.

    ``hosts`` (default: the item's ``allowed_hosts``) is where the flow's browser may
    go; it may shrink while the flow runs. Cancelling ``run`` ends the flow at once.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult: ...


class NoopExecutor:
    """Completes every flow at once without a browser (engine benchmarks)."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(
        self, item: FlowDispatched, report: FlowReport, hosts: AllowedHosts | None = None
    ) -> FlowResult:
        return FlowResult(clicks_done=item.clicks, pages=1)
