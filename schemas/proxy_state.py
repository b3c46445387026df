"""A proxy's health as the log tells it: the fold the engine, the dispatcher and the read
model share.

A registered proxy is ``ok`` (handed out) until the engine marks it ``bad`` after
repeated ``ProxyFailed``; it is ``ok`` again once ``ProxyRestored``; ``retired`` is for
good. ``version`` is the stream sequence of the proxy's own last event (its
``tb.proxy.<id>.*`` subjects, the optimistic-concurrency scope): failures are reported
on flow subjects and never move it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from schemas.events import (
    Event,
    ProxyCheckFailed,
    ProxyEvent,
    ProxyFailed,
    ProxyMarkedBad,
    ProxyRegistered,
    ProxyRestored,
    ProxyRetired,
)

MAX_FAILURES_KEPT = 100  # more than any sensible threshold: older ones can never count


class ProxyStatus(StrEnum):
    NONE = "none"
    OK = "ok"
    BAD = "bad"
    RETIRED = "retired"


@dataclass(frozen=True)
class ProxyFailure:
    at: datetime
    key: str  # ``<flow_id>:<attempt>:<n>``: one report, however often it is stored
    error: str
    reason: str


@dataclass(frozen=True)
class ProxyState:
    proxy_id: str = ""
    status: ProxyStatus = ProxyStatus.NONE
    scheme: str = ""
    host: str = ""
    port: int = 0
    has_credentials: bool = False
    label: str | None = None
    registered_seq: int = 0  # its place in the pool: proxies are offered in this order
    # ProxyFailed while ok, since it was registered or last restored, oldest first
    failures: tuple[ProxyFailure, ...] = ()
    bad_since: datetime | None = None
    bad_until: datetime | None = None  # the next check is due then
    restored_at: datetime | None = None
    marks: int = 0  # times it was marked bad: the current episode's number
    checks_failed: int = 0  # failed checks in the current episode
    version: int = 0

    @property
    def usable(self) -> bool:
        return self.status == ProxyStatus.OK


def failure_key(event: ProxyFailed) -> str:
    return f"{event.flow_id}:{event.attempt}:{event.n}"


def evolve_proxy(state: ProxyState, event: Event, seq: int = 0) -> ProxyState:
    """Fold one event in; events of other proxies, or of a proxy never registered, change
    nothing, and a retired proxy stays retired."""
    if isinstance(event, ProxyFailed):
        return _failed(state, event)
    if not isinstance(event, ProxyEvent) or state.status == ProxyStatus.RETIRED:
        return state
    if state.status == ProxyStatus.NONE and not isinstance(event, ProxyRegistered):
        return state
    if seq and seq <= state.version:
        return state  # already folded in (a reader that ran ahead sees it again)
    state = replace(state, version=max(state.version, seq))
    match event:
        case ProxyRegistered() if state.status == ProxyStatus.NONE:
            return replace(
                state,
                proxy_id=event.proxy_id,
                status=ProxyStatus.OK,
                scheme=event.scheme,
                host=event.host,
                port=event.port,
                has_credentials=event.has_credentials,
                label=event.label,
                registered_seq=seq,
            )
        case ProxyRetired():
            return replace(state, status=ProxyStatus.RETIRED, failures=())
        case ProxyMarkedBad(at=at, bad_until=until) if state.status == ProxyStatus.OK:
            return replace(
                state,
                status=ProxyStatus.BAD,
                bad_since=at,
                bad_until=until,
                marks=state.marks + 1,
                checks_failed=0,
                failures=(),
            )
        case ProxyCheckFailed(bad_until=until) if state.status == ProxyStatus.BAD:
            return replace(state, bad_until=until, checks_failed=state.checks_failed + 1)
        case ProxyRestored(at=at) if state.status == ProxyStatus.BAD:
            return replace(state, status=ProxyStatus.OK, bad_until=None, restored_at=at)
    return state


def _failed(state: ProxyState, event: ProxyFailed) -> ProxyState:
    # while bad, failures are those of flows that got it before: they say nothing new
    if state.status != ProxyStatus.OK or event.proxy_id != state.proxy_id:
        return state
    key = failure_key(event)
    if any(f.key == key for f in state.failures):
        return state
    failure = ProxyFailure(event.at, key, event.error, event.reason)
    failures = sorted((*state.failures, failure), key=lambda f: f.at)[-MAX_FAILURES_KEPT:]
    return replace(state, failures=tuple(failures))


def fold_into(proxies: dict[str, ProxyState], event: ProxyEvent | ProxyFailed, seq: int) -> None:
    """Fold one event into a table of the proxies that are not retired (by id)."""
    pid = event.proxy_id
    if pid is None:
        return
    proxy = evolve_proxy(proxies.get(pid, ProxyState()), event, seq)
    if proxy.status == ProxyStatus.RETIRED:
        proxies.pop(pid, None)
    elif proxy.status != ProxyStatus.NONE:
        proxies[pid] = proxy
