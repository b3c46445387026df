"""Proxy failover within one flow: the work item's candidates, tried in order.

A flow's work item names its upstream proxy candidates by id (``FlowDispatched.proxies``,
healthy ones only, in the order to try them). ``FlowProxies`` holds the current one; a
connection that fails because of the proxy is reported (``ProxyFailed``, which the
engine counts towards marking the proxy bad) and the flow goes on with the next
candidate, for this connection and every later one. When every candidate has failed,
``ProxiesExhausted``: the flow fails (a retry gets candidates again, without the ones
the engine has marked bad meanwhile).

Each candidate's endpoint and credentials are read from the proxy secrets bucket by id
(``ProxySecretCache``: cached, read again on a miss); a candidate whose secret is not
there is reported (error ``no_secret``) and skipped.

The way to connect through a proxy is passed in: the runner's egress proxy chains each
of a flow's connections to its upstream through ``FlowProxies.open``, with its own
tunnel function; ``errors`` names the exceptions that function raises for a proxy's
failure (anything else, such as a refusal by the egress rule, is not the proxy's and
passes through untouched).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import nats.errors
import nats.js.errors
import structlog

from agents.executor import FlowReport
from engine.bus import Bus
from schemas import subjects
from schemas.events import FlowDispatched
from schemas.proxies import ProxyEndpoint, ProxyError, ProxyErrorKind, decode_secret

log = structlog.get_logger("tb.agent")
T = TypeVar("T")


class SecretSource(Protocol):
    async def get(self, proxy_id: str) -> ProxyEndpoint | None: ...


class ProxySecretCache:
    """Proxy endpoints by id from the secrets bucket; a hit is kept, a miss read again
    next time (the bucket is written before a proxy's id is ever handed out)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._known: dict[str, ProxyEndpoint] = {}
        self.reads = 0  # reads of the bucket, for tests and metrics

    async def get(self, proxy_id: str) -> ProxyEndpoint | None:
        known = self._known.get(proxy_id)
        if known is not None:
            return known
        self.reads += 1
        try:
            kv = await self.bus.kv(subjects.PROXY_SECRETS_BUCKET)
            entry = await kv.get(proxy_id)
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            return None  # no such key (or a purged one), or no bucket yet
        try:
            endpoint = decode_secret(entry.value or b"")
        except ValueError:
            log.warning("proxy.secret_unreadable", proxy_id=proxy_id)
            return None
        self._known[proxy_id] = endpoint
        return endpoint


@dataclass(frozen=True)
class ProxyFailure:
    """One failure of one candidate, as ``ProxyFailed`` records it."""

    proxy_id: str
    proxy: str  # its label: scheme://host:port
    error: ProxyErrorKind
    reason: str
    n: int  # the flow's n-th proxy failure


Report = Callable[[ProxyFailure], Awaitable[None]]


class ProxiesExhausted(Exception):
    """Every candidate of the flow failed."""

    def __init__(self, tried: int) -> None:
        super().__init__(f"all {tried} proxy candidate(s) failed")
        self.tried = tried


def failure_kind(err: BaseException) -> ProxyErrorKind:
    """What kind of proxy failure ``err`` is: a ``ProxyError`` says so; another tunnel
    function's error is judged by what caused it (a timeout, a connection that could not
    be made), else the proxy refused."""
    if isinstance(err, ProxyError):
        return err.kind
    cause = err.__cause__ or err
    if isinstance(cause, TimeoutError):
        return "timeout"
    if isinstance(cause, OSError):
        return "unreachable"
    return "refused"


class FlowProxies:
    """One flow's candidates and which of them is in use.

    Connections of a flow may fail at the same time on the same proxy: the failure is
    reported once and the flow moves on once; the others retry on the next candidate.
    """

    def __init__(
        self,
        candidates: Sequence[str],
        secrets: SecretSource,
        report: Report,
        *,
        errors: tuple[type[Exception], ...] = (ProxyError,),
    ) -> None:
        self.candidates = list(candidates)
        self.secrets, self.report, self.errors = secrets, report, errors
        self.failures: list[ProxyFailure] = []
        self._index = 0
        self._current: ProxyEndpoint | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def for_flow(
        cls, item: FlowDispatched, secrets: SecretSource, report: FlowReport
    ) -> FlowProxies:
        """A flow's candidates as its work item names them, each failure reported as
        ``ProxyFailed`` through the flow's report; ``secrets`` is the runner's one cache,
        shared by its flows."""

        async def proxy_failed(failure: ProxyFailure) -> None:
            try:
                await report.proxy_failed(
                    failure.proxy_id, failure.proxy, failure.error, failure.reason
                )
            except nats.errors.Error as err:
                # the flow goes on: a lost report only delays the proxy being marked bad
                log.warning("proxy.report_failed", proxy_id=failure.proxy_id, error=repr(err))

        return cls(item.proxies, secrets, proxy_failed)

    @property
    def direct(self) -> bool:
        """No proxy: the flow's connections go straight out."""
        return not self.candidates

    @property
    def exhausted(self) -> bool:
        """Every candidate has failed: the flow's connections cannot leave."""
        return bool(self.candidates) and self._index >= len(self.candidates)

    @property
    def current_id(self) -> str | None:
        return self.candidates[self._index] if self._index < len(self.candidates) else None

    async def current(self) -> tuple[int, ProxyEndpoint]:
        """The candidate in use (its index and endpoint); ``ProxiesExhausted`` when none
        is left. A candidate without a secret is reported and passed over."""
        async with self._lock:
            while self._index < len(self.candidates):
                if self._current is not None:
                    return self._index, self._current
                pid = self.candidates[self._index]
                endpoint = await self.secrets.get(pid)
                if endpoint is not None:
                    self._current = endpoint
                    continue
                await self._fail(pid, pid, "no_secret", "its endpoint is not in the secrets bucket")
            raise ProxiesExhausted(len(self.candidates))

    async def open(self, attempt: Callable[[ProxyEndpoint], Awaitable[T]]) -> T:
        """``attempt(endpoint)`` through the current candidate, moving down the list on
        each failure of a proxy; ``ProxiesExhausted`` when none is left."""
        while True:
            index, endpoint = await self.current()
            try:
                return await attempt(endpoint)
            except self.errors as err:
                kind = failure_kind(err)
                async with self._lock:
                    if self._index == index:  # not moved on by another connection meanwhile
                        await self._fail(self.candidates[index], endpoint.label, kind, str(err))

    async def _fail(self, pid: str, label: str, kind: ProxyErrorKind, reason: str) -> None:
        failure = ProxyFailure(pid, label, kind, reason[:1000], len(self.failures))
        self.failures.append(failure)
        self._index += 1
        self._current = None
        log.warning(
            "proxy.failed", proxy_id=pid, proxy=label, error=kind, next=self.current_id or "none"
        )
        await self.report(failure)
