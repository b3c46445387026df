"""Proxy registration and health as a pure decider: ``decide(proxy, cmd, meta, policy)``.

The fold is ``schemas.proxy_state`` (shared with the dispatcher and the read model); no
clock, ids or I/O in here: ``Meta`` brings the time, the health service the check's
outcome.

The health rule: ``policy.failures`` ProxyFailed within ``policy.window`` mark an ok
proxy bad for ``policy.cooldown``; once that has passed a check runs, and its outcome
restores the proxy or extends the cool-down (doubling, up to ``policy.max_cooldown``).
``due`` says which of these steps the state calls for at a given time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from engine.errors import Conflict, NotFound
from engine.jobs.decider import Meta
from schemas.events import (
    ProxyCheckFailed,
    ProxyEvent,
    ProxyEvents,
    ProxyMarkedBad,
    ProxyRegistered,
    ProxyRestored,
    ProxyRetired,
)
from schemas.proxies import ProxyDns, ProxyScheme
from schemas.proxy_state import ProxyFailure, ProxyState, ProxyStatus

__all__ = [
    "CheckProxy",
    "HealthPolicy",
    "MarkBad",
    "Meta",
    "ProxyCommand",
    "RecordCheck",
    "RegisterProxy",
    "RetireProxy",
    "decide",
    "due",
]

E = TypeVar("E", bound=ProxyEvent)


@dataclass(frozen=True)
class HealthPolicy:
    failures: int = 3  # ProxyFailed within ``window`` that mark a proxy bad
    window: timedelta = timedelta(seconds=60)
    cooldown: timedelta = timedelta(seconds=30)  # before the first check
    max_cooldown: timedelta = timedelta(minutes=10)  # the longest a failed check extends it
    check_timeout: float = 5.0  # seconds a check may take

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("failures must be at least 1")
        if min(self.window, self.cooldown, self.max_cooldown) <= timedelta(0):
            raise ValueError("window and cool-downs must be positive")


@dataclass(frozen=True)
class RegisterProxy:
    proxy_id: str
    scheme: ProxyScheme
    host: str
    port: int
    has_credentials: bool
    label: str | None = None
    bypass: tuple[str, ...] = ()
    dns: ProxyDns = "local"


@dataclass(frozen=True)
class RetireProxy:
    proxy_id: str
    reason: str = ""


@dataclass(frozen=True)
class MarkBad:
    """Mark the proxy bad if enough of its failures fall within the window ending now."""

    proxy_id: str


@dataclass(frozen=True)
class CheckProxy:
    """The cool-down is over: the health service should check the proxy (no event)."""

    proxy_id: str


@dataclass(frozen=True)
class RecordCheck:
    """What the check found: ``failure`` is None when the proxy worked."""

    proxy_id: str
    failure: str | None
    check: str = ""


ProxyCommand = RegisterProxy | RetireProxy | MarkBad | RecordCheck


def recent_failures(proxy: ProxyState, now: datetime, policy: HealthPolicy) -> list[ProxyFailure]:
    """Its failures within the window ending ``now``; a runner's clock ahead of the
    engine's puts some after ``now``: they count, they happened."""
    return [f for f in proxy.failures if f.at > now - policy.window]


def due(proxy: ProxyState, now: datetime, policy: HealthPolicy) -> MarkBad | CheckProxy | None:
    """The health step the proxy's state calls for at ``now``, if any."""
    if (
        proxy.status == ProxyStatus.OK
        and len(recent_failures(proxy, now, policy)) >= policy.failures
    ):
        return MarkBad(proxy.proxy_id)
    if proxy.status == ProxyStatus.BAD and proxy.bad_until is not None and now >= proxy.bad_until:
        return CheckProxy(proxy.proxy_id)
    return None


def extended_cooldown(proxy: ProxyState, policy: HealthPolicy) -> timedelta:
    """The cool-down after the proxy's next failed check: doubling, at most the maximum."""
    factor: int = 2 ** min(proxy.checks_failed + 1, 30)
    extended: timedelta = min(policy.cooldown * factor, policy.max_cooldown)
    return extended


def decide(
    proxy: ProxyState, cmd: ProxyCommand, meta: Meta, policy: HealthPolicy | None = None
) -> list[ProxyEvents]:
    policy = policy or HealthPolicy()
    pid = cmd.proxy_id
    match cmd:
        case RegisterProxy():
            if proxy.status != ProxyStatus.NONE:
                raise Conflict("proxy_id", f"proxy {pid} already exists ({proxy.status.value})")
            return [
                _emit(
                    ProxyRegistered,
                    meta,
                    pid,
                    scheme=cmd.scheme,
                    host=cmd.host,
                    port=cmd.port,
                    has_credentials=cmd.has_credentials,
                    label=cmd.label,
                    bypass=list(cmd.bypass),
                    dns=cmd.dns,
                )
            ]
        case RetireProxy(reason=reason):
            if proxy.status == ProxyStatus.NONE:
                raise NotFound("proxy_id", f"no proxy {pid}")
            if proxy.status == ProxyStatus.RETIRED:
                raise Conflict("proxy_id", f"proxy {pid} is already retired")
            return [_emit(ProxyRetired, meta, pid, reason=reason)]
        case MarkBad():
            if proxy.status != ProxyStatus.OK:
                return []
            recent = recent_failures(proxy, meta.at, policy)
            if len(recent) < policy.failures:
                return []
            last = recent[-1]
            return [
                _emit(
                    ProxyMarkedBad,
                    meta,
                    pid,
                    failures=len(recent),
                    window_seconds=policy.window.total_seconds(),
                    bad_until=meta.at + policy.cooldown,
                    reason=f"{last.error}: {last.reason}"[:4096],
                )
            ]
        case RecordCheck(failure=failure, check=check):
            if proxy.status != ProxyStatus.BAD:
                return []  # retired, or restored by another engine meanwhile
            if proxy.bad_until is not None and meta.at < proxy.bad_until:
                return []  # a check from before the cool-down was extended
            if failure is None:
                return [_emit(ProxyRestored, meta, pid, check=check)]
            until = meta.at + extended_cooldown(proxy, policy)
            return [_emit(ProxyCheckFailed, meta, pid, reason=failure[:4096], bad_until=until)]
    raise AssertionError(f"unhandled command {cmd!r}")


def _emit(kind: type[E], meta: Meta, proxy_id: str, **fields: Any) -> E:
    return kind(id=meta.id, at=meta.at, actor=meta.actor, proxy_id=proxy_id, **fields)
