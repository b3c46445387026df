"""What one flow brings to the egress proxy: its consented ports, and where refusals go."""

from __future__ import annotations

from urllib.parse import urlsplit

from structlog.typing import FilteringBoundLogger

from agents.egress.proxy import Refused
from agents.egress.rule import normal_host
from agents.executor import FlowReport
from schemas.consent_state import DEFAULT_PORTS, WEB_PORTS
from schemas.events import FlowDispatched

# a page that retries a refused request in a loop must not flood the log: each distinct
# refusal is reported once, and at most this many per flow
MAX_REFUSALS_REPORTED = 100


def consented_ports(item: FlowDispatched) -> dict[str, frozenset[int]]:
    """The ports each allowed host of the work item may be reached on.

    Items dispatched before consents recorded their ports carry none: their hosts get
    80, 443 and the port of the target URL.
    """
    if item.allowed_ports:
        return {normal_host(h): frozenset(p) for h, p in item.allowed_ports.items()}
    parts = urlsplit(item.url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    hosts = {normal_host(h) for h in item.allowed_hosts} | {normal_host(parts.hostname or "")}
    return {h: WEB_PORTS | {port} for h in hosts if h}


class FlowEgressReport:
    """Turns the proxy's refusals for one flow into ``EgressRefused`` reports."""

    __slots__ = ("_seen", "log", "report")

    def __init__(self, report: FlowReport, flog: FilteringBoundLogger) -> None:
        self.report, self.log = report, flog
        self._seen: set[tuple[str, int, str]] = set()

    async def refused(self, refusal: Refused) -> None:
        key = (refusal.host, refusal.port, refusal.request)
        if key in self._seen or len(self._seen) >= MAX_REFUSALS_REPORTED:
            return
        self._seen.add(key)
        await self.report.egress_refused(
            refusal.host, refusal.port, str(refusal.reason), refusal.request
        )
