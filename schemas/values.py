"""Value types shared by events, commands and DTOs."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

OsName = Literal["linux", "windows", "macos"]
BrowserName = Literal["chromium", "firefox", "webkit"]

Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2048, pattern=r"^https?://[^\s/?#]+")]
Domain = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=253,
        pattern=r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$",
    ),
]


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


class JobSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a job runs. Later settings get defaults so older events still decode."""

    instance_count: Annotated[int, msgspec.Meta(ge=1, le=500)] = 1
    session_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 5.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


class ConsentCaps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-domain limits the dispatcher never exceeds."""

    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    max_flows_per_minute: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 600
