"""The proxy health service: follow failures, mark proxies bad, check them, restore them.

It folds ``tb.proxy.>`` (the proxies), ``tb.flow.*.ProxyFailed`` (runners' reports) and
``tb.consent.>`` (where a check may connect) and, once caught up with the log, acts on
what ``decider.due`` says each proxy's state calls for: a ``ProxyMarkedBad`` decision,
or a check after the cool-down whose outcome is decided into ``ProxyRestored`` or
``ProxyCheckFailed``. Decisions are appended with optimistic concurrency on
``tb.proxy.<id>.*`` and a msg-id naming the health step (episode and check number), so
two engines never record one step twice; a conflict means another writer moved the
proxy on, and the next round decides on the state the reader brings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from engine.bus import Bus, ConcurrencyConflict, Expect
from engine.proxies.check import (
    ProxyCheck,
    Target,
    check_name,
    check_proxy,
    check_targets,
)
from engine.proxies.decider import CheckProxy, HealthPolicy, MarkBad, Meta, RecordCheck, decide, due
from engine.proxies.secrets import ProxySecrets
from engine.transient import Backoff, is_transient, until_done
from schemas import subjects
from schemas.consent_state import Consent, evolve_consent
from schemas.events import (
    ConsentEvent,
    ConsentGiven,
    Event,
    ProxyCheckFailed,
    ProxyEvent,
    ProxyEvents,
    ProxyFailed,
)
from schemas.ids import new_id, utcnow
from schemas.proxy_state import ProxyState, ProxyStatus, fold_into

log = structlog.get_logger("tb.proxies")

INPUTS = [subjects.ALL_PROXIES, subjects.ALL_PROXY_FAILURES, "tb.consent.>"]


@dataclass
class ProxyHealth:
    bus: Bus
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    clock: Callable[[], datetime] = utcnow
    check: ProxyCheck = check_proxy
    actor: str = "system"
    tick_interval: float = 0.5
    proxies: dict[str, ProxyState] = field(default_factory=dict)
    consents: dict[str, Consent] = field(default_factory=dict)
    evidence: dict[str, str] = field(default_factory=dict)  # domain -> where it was verified
    secrets: ProxySecrets = field(init=False)
    backoff: Backoff = field(default_factory=lambda: Backoff("proxy-health"))
    _checking: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _broken: BaseException | None = None  # what a background check met, raised by ``tick``
    _caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.secrets = ProxySecrets(self.bus)

    async def run(self) -> None:
        reader = asyncio.create_task(self._follow(), name="proxy-health-reader")
        caught_up = asyncio.ensure_future(self._caught_up.wait())
        try:
            # decide nothing before the state is the log's; a reader that fails first raises
            await asyncio.wait([reader, caught_up], return_when=asyncio.FIRST_COMPLETED)
            while True:
                if reader.done():
                    reader.result()
                await self._retrying(self.tick)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick_interval):
                        await self._wake.wait()
        finally:
            caught_up.cancel()
            for task in [reader, *self._checking.values()]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def wait_ready(self) -> None:
        await self._caught_up.wait()

    async def _follow(self) -> None:
        position = 0
        while True:
            try:
                async for batch in self.bus.read_batches(
                    position + 1, INPUTS, on_caught_up=self._caught_up.set
                ):
                    for env in batch.envelopes:
                        self.apply(env.event, env.seq)
                    position = batch.last_seq
                    self._wake.set()
            except Exception as err:
                if not is_transient(err, self.bus.nc):
                    raise
                await self.backoff.failed(err)

    def apply(self, event: Event, seq: int) -> None:
        if isinstance(event, ProxyEvent | ProxyFailed):
            fold_into(self.proxies, event, seq)
        elif isinstance(event, ConsentEvent):
            domain = event.domain.lower()
            self.consents[domain] = evolve_consent(
                self.consents.get(domain, Consent(domain=domain)), event, seq
            )
            if isinstance(event, ConsentGiven):
                self.evidence[domain] = event.evidence

    async def _retrying(self, step: Callable[[], Awaitable[None]]) -> None:
        await until_done(step, self.backoff, self.bus.nc)

    async def tick(self) -> None:
        """Decide what is due for every proxy now; checks run in the background."""
        if self._broken is not None:
            raise self._broken
        now = self.clock()
        for pid, proxy in list(self.proxies.items()):
            match due(proxy, now, self.policy):
                case MarkBad() as cmd:
                    await self._decide(proxy, cmd, now)
                case CheckProxy() if pid not in self._checking:
                    self._checking[pid] = asyncio.create_task(
                        self._check(pid), name=f"proxy-check-{pid}"
                    )

    async def _check(self, pid: str) -> None:
        """Check the proxy and decide on the outcome; NATS trouble leaves it for the next
        round, any other error is kept for the loop to raise (its supervisor restarts it)."""
        try:
            failure, what = await self._probe(pid)
            proxy = self.proxies.get(pid)
            if proxy is not None:
                await self._decide(proxy, RecordCheck(pid, failure, what), self.clock())
        except Exception as err:
            if not is_transient(err, self.bus.nc):
                self._broken = err
        finally:
            self._checking.pop(pid, None)
            self._wake.set()

    async def _probe(self, pid: str) -> tuple[str | None, str]:
        """Why the proxy failed its check (``None``: it passed), and what the check did."""
        try:
            endpoint = await self.secrets.get(pid)
        except ValueError:
            return "no_secret: its stored endpoint is unreadable", "secret lookup"
        if endpoint is None:
            return "no_secret: its endpoint is not in the secrets bucket", "secret lookup"
        # no valid consent at all: only the proxy itself is connected to
        targets: list[Target | None] = [
            *check_targets(self.consents.values(), self.evidence, self.clock())
        ] or [None]
        failure: str | None = None
        for target in targets:
            failure = await self.check(endpoint, target, self.policy.check_timeout)
            if failure is None:
                return None, check_name(endpoint, target)
        return failure, check_name(endpoint, targets[-1])

    async def _decide(self, proxy: ProxyState, cmd: MarkBad | RecordCheck, now: datetime) -> None:
        meta = Meta(id=new_id(), at=now, actor=self.actor)
        scope = subjects.proxy_stream_filter(proxy.proxy_id)
        expected = proxy.version
        for event in decide(proxy, cmd, meta, self.policy):
            msg_id = _msg_id(proxy, event)
            try:
                ack = await self.bus.append(event, msg_id=msg_id, expect=Expect(scope, expected))
            except ConcurrencyConflict:
                return  # another writer moved the proxy on: decide again on what it wrote
            expected = ack.seq
            if not ack.duplicate:
                self.apply(event, ack.seq)
            log.info(
                "proxy." + type(event).__name__,
                proxy_id=proxy.proxy_id,
                proxy=f"{proxy.scheme}://{proxy.host}:{proxy.port}",
                seq=ack.seq,
            )


def _msg_id(proxy: ProxyState, event: ProxyEvents) -> str:
    kind = type(event).__name__
    # decided on ``proxy``: an ok proxy's next episode is marks + 1; a bad one's is marks
    episode = proxy.marks + 1 if proxy.status == ProxyStatus.OK else proxy.marks
    n = proxy.checks_failed if isinstance(event, ProxyCheckFailed) else 0
    return subjects.proxy_health_msg_id(proxy.proxy_id, kind, episode, n)
