"""Value types shared by events, commands and DTOs.

Types carry their rules, so a value that breaks one fails to decode wherever it
enters: an API body (400 naming the field) or a message on the bus (quarantined).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from schemas.devices import DeviceProfile
from schemas.families import BrowserName, OsName
from schemas.ids import ID_PATTERN

__all__ = ["BrowserName", "OsName"]  # spelled in schemas.families, imported from here too

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, min_length=1, max_length=128)]
"""An id that becomes a subject token: a job, flow or runner id."""

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A point in time with its offset: a naive datetime cannot be compared with the clock."""

# integers stay well inside what SQLite holds, and sums of them too
Attempt = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Index = Annotated[int, msgspec.Meta(ge=0, le=100_000)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600 * 1000)]
HttpStatus = Annotated[int, msgspec.Meta(ge=0, le=999)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN_PATTERN = rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$(?!\n)"
Domain = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=DOMAIN_PATTERN)]
_DOMAIN = re.compile(DOMAIN_PATTERN)

Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s/?#]+")]


_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")  # \s: what str.isspace() calls space


# every work item of a target carries its URL, and is checked where it is built and
# wherever it is read: remember the verdicts (a pure function of the string)
@functools.lru_cache(maxsize=4096)
def url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL a browser can be sent to, or ``None``."""
    if _SPACE_OR_CONTROL.search(url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as err:
        return f"is not a valid URL ({err})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    host = parts.hostname or ""
    if not host:
        return "must name a host"
    if port == 0:
        return "port must be 1-65535"
    if not host_is_valid(host):
        return f"host {host!r} is neither a domain name nor an IP address"
    return None


def host_is_valid(host: str) -> bool:
    if _DOMAIN.fullmatch(host.rstrip(".")) is not None:
        return True  # most hosts are names: no exception raised and caught for them
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class JobStatus(StrEnum):
    """The one spelling of a job's status (the job decider's, the read model's, the API's)."""

    NEW = "new"
    CREATED = "created"
    REFUSED = "refused"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


JobKind = Literal["flows", "external"]
"""``flows``: the engine plans and dispatches browser flows to runners; ``external``: a
worker outside the system does the work and reports it by log lines (no targets, never
dispatched)."""

TERMINAL_JOB_STATUSES = frozenset(
    {JobStatus.REFUSED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
)


class Platform(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a flow may run: the runner's operating system and browser family."""

    os: OsName = "linux"
    browser: BrowserName = "chromium"


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One target URL of a job: how many flows to run against it and how many clicks each."""

    url: Url
    flows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    clicks: Annotated[int, msgspec.Meta(ge=0, le=50)] = 0
    referrer: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    label: Annotated[str, msgspec.Meta(max_length=200)] | None = None

    def __post_init__(self) -> None:
        # msgspec reports a ValueError raised here as a validation error at this target
        problem = url_problem(self.url)
        if problem is not None:
            raise ValueError(f"url {problem}")
        if self.referrer is not None and (problem := url_problem(self.referrer)) is not None:
            raise ValueError(f"referrer {problem}")


class DatasetRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One version of a dataset, as a job names it."""

    id: Id
    version: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class UsedVersion(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The exact version of a dataset a job was made from, with the sha256 of its rows."""

    id: Id
    version: int
    sha256: str


class DnsEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of a job's DNS mode: where ``host`` resolves for its flows."""

    host: Domain
    address: Annotated[str, msgspec.Meta(max_length=45)]

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"dns: {self.address!r} is not an IP address") from None


ProxyLabel = Annotated[
    str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]*$")
]
"""A name several registered proxies can share (a region, a provider), to pool them."""


class ProxyPool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which registered proxies a job's flows go through: the proxies ``ids`` names (in
    that order), or every proxy carrying ``label``, or, with neither, every registered one.
    Retired proxies and those marked bad are never handed out."""

    ids: Annotated[list[Id], msgspec.Meta(max_length=1000)] = []
    label: ProxyLabel | None = None

    def __post_init__(self) -> None:
        if self.ids and self.label is not None:
            raise ValueError("label cannot be combined with ids: name proxies one way")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("ids must not repeat a proxy")


Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]


class SecondsRange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A span of seconds a flow draws from (uniformly); equal ends make it constant."""

    min_seconds: Seconds
    max_seconds: Seconds

    def __post_init__(self) -> None:
        if self.min_seconds > self.max_seconds:
            raise ValueError(
                f"min_seconds ({self.min_seconds}) must not exceed max_seconds ({self.max_seconds})"
            )


class SessionDuration(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How long a flow browses (its time on pages). ``constant``: ``seconds``.
    ``variable``: drawn per flow within ``min_seconds``..``max_seconds``, uniformly, or
    from a normal distribution (``mean_seconds``, ``stddev_seconds``) cut to those bounds."""

    mode: Literal["constant", "variable"] = "constant"
    seconds: Seconds | None = None
    min_seconds: Seconds | None = None
    max_seconds: Seconds | None = None
    distribution: Literal["uniform", "normal"] = "uniform"
    mean_seconds: Seconds | None = None
    stddev_seconds: Seconds | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        """What is wrong, as ``<field> <rule>`` (the API names the field)."""
        given = [
            name
            for name in ("seconds", "min_seconds", "max_seconds", "mean_seconds", "stddev_seconds")
            if getattr(self, name) is not None
        ]
        if self.mode == "constant":
            if self.seconds is None:
                return "seconds must be given for mode 'constant'"
            extra = [name for name in given if name != "seconds"]
            if self.distribution != "uniform":
                extra.insert(0, "distribution")
            if extra:
                return f"{extra[0]} is not for mode 'constant' (it takes seconds)"
            return None
        for name in ("min_seconds", "max_seconds"):
            if getattr(self, name) is None:
                return f"{name} must be given for mode 'variable'"
        if self.seconds is not None:
            return "seconds is not for mode 'variable' (it takes min_seconds and max_seconds)"
        low, high = self.min_seconds or 0.0, self.max_seconds or 0.0
        if low > high:
            return f"min_seconds ({low}) must not exceed max_seconds ({high})"
        if self.distribution == "uniform":
            for name in ("mean_seconds", "stddev_seconds"):
                if getattr(self, name) is not None:
                    return f"{name} is for distribution 'normal'"
            return None
        for name in ("mean_seconds", "stddev_seconds"):
            if getattr(self, name) is None:
                return f"{name} must be given for distribution 'normal'"
        if not low <= (self.mean_seconds or 0.0) <= high:
            return f"mean_seconds must lie within min_seconds..max_seconds ({low}..{high})"
        return None

    @property
    def longest(self) -> float:
        if self.max_seconds is not None:
            return self.max_seconds
        return self.seconds or 0.0


class JobSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a job runs. Later settings get defaults so older events still decode.

    ``session_seconds`` is a constant session duration; ``session_duration``, when
    given, rules instead (constant or variable)."""

    instance_count: Annotated[int, msgspec.Meta(ge=1, le=500)] = 1
    session_seconds: Seconds = 5.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    proxies: ProxyPool | None = None  # None: flows connect directly
    proxy_switching: bool = False  # rotate the pool's order per flow (else one order for all)

    session_duration: SessionDuration | None = None
    page_traffic: Annotated[int, msgspec.Meta(ge=1, le=50)] = 1
    traffic_delay: SecondsRange | None = None
    human_surfing: bool = True
    click_timing: SecondsRange | None = None
    external_click_ratio: Ratio = 0.0
    # a tuple: the settings stay hashable, as a frozen value should be
    devices: Annotated[tuple[DeviceProfile, ...], msgspec.Meta(max_length=100)] = ()
    platform_switching: bool = False
    # DNS mode: empty is the system resolver; else host -> IP address, applied by the
    # runner's egress proxy, which then checks the address it connects to
    dns: Annotated[tuple[DnsEntry, ...], msgspec.Meta(max_length=1000)] = ()
    # a targets dataset row that gives no flowTarget / clickTarget takes these
    target_flows: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    target_clicks: Annotated[int, msgspec.Meta(ge=0, le=50)] = 0

    @property
    def host_map(self) -> dict[str, str]:
        return {entry.host.lower(): entry.address for entry in self.dns}

    @property
    def session(self) -> SessionDuration:
        if self.session_duration is not None:
            return self.session_duration
        return SessionDuration(seconds=self.session_seconds)

    @property
    def longest_flow_seconds(self) -> float:
        """The most time a flow spends by design: its longest session and traffic delay
        (navigations come on top)."""
        delay = self.traffic_delay.max_seconds if self.traffic_delay is not None else 0.0
        return self.session.longest + delay


class ConsentCaps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-domain limits the dispatcher never exceeds."""

    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    max_flows_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 600
