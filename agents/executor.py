"""The flow executor port: what a runner asks of a browser, and a no-op for benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import structlog

from schemas.events import FlowDispatched

log = structlog.get_logger("tb.agent")

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
    """Runs flows; ``run`` may be called for several flows at once."""

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
