"""Device profiles: a device descriptor of the job's catalogue, named by a job, with overrides.

A profile names a descriptor (or ``default``: the runner's browser as it is) and may
override any of its fields. Descriptors come from a version of the device catalogue
(``schemas.device_catalogue``): a job resolves its profiles against the version it was
created with. Names are checked where a job is created, not where an event is decoded:
a descriptor that a later catalogue drops must not make an old job's events
undecodable.

``os`` and ``browser`` are the families a device presents as: a descriptor's own come
from its User-Agent and its default browser type, a profile may name them.
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Mapping
from typing import Annotated, Any, get_args

import msgspec

from schemas.families import BrowserName, DeviceOs, os_of_user_agent

DEFAULT_DEVICE = "default"  # the runner's browser as launched: its own User-Agent, 1280x800
DEFAULT_VIEWPORT = (1280, 800)

Pixels = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
LOCALE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}$"
Descriptor = Mapping[str, Any]  # one of Playwright's device descriptors, as it gives them


class Viewport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    width: Pixels
    height: Pixels


class DeviceProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A device a flow presents as: a catalogue descriptor by name, fields overridden."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = DEFAULT_DEVICE
    user_agent: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    viewport: Viewport | None = None
    device_scale_factor: Annotated[float, msgspec.Meta(ge=0.5, le=5)] | None = None
    is_mobile: bool | None = None
    has_touch: bool | None = None
    locale: Annotated[str, msgspec.Meta(max_length=40, pattern=LOCALE_PATTERN)] | None = None
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    os: DeviceOs | None = None
    browser: BrowserName | None = None

    def __post_init__(self) -> None:
        if self.timezone is not None and self.timezone not in time_zones():
            raise ValueError(
                f"timezone must be an IANA time zone name such as 'Europe/Berlin'"
                f" (got {self.timezone!r})"
            )
        if self.user_agent is not None and any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for ch in self.user_agent
        ):
            raise ValueError("user_agent must not contain control characters")


class Device(msgspec.Struct, frozen=True):
    """A profile resolved against a catalogue: what a browser context is given.

    ``user_agent`` ``None`` keeps the browser's own (still suffixed by the runner);
    ``os`` and ``browser`` ``None``: not said (``default`` is the runner's own)."""

    name: str
    user_agent: str | None
    viewport: Viewport
    device_scale_factor: float
    is_mobile: bool
    has_touch: bool
    locale: str | None
    timezone: str | None
    screen: Viewport | None = None
    os: DeviceOs | None = None
    browser: BrowserName | None = None


@functools.cache
def time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _viewport(value: Any) -> Viewport | None:
    if not isinstance(value, dict):
        return None
    return Viewport(width=int(value["width"]), height=int(value["height"]))


def descriptor_families(descriptor: Descriptor) -> tuple[DeviceOs | None, BrowserName | None]:
    """The os family its User-Agent claims and its default browser type."""
    user_agent = descriptor.get("user_agent")
    browser = descriptor.get("default_browser_type")
    return (
        os_of_user_agent(user_agent) if isinstance(user_agent, str) else None,
        browser if browser in get_args(BrowserName) else None,
    )


def resolve(profile: DeviceProfile, descriptors: Mapping[str, Descriptor]) -> Device:
    """The profile's descriptor (from ``descriptors``, a catalogue's) with its overrides
    on top; ``KeyError`` for a name the catalogue does not hold."""
    base: Descriptor = {} if profile.name == DEFAULT_DEVICE else descriptors[profile.name]
    os, browser = descriptor_families(base)
    width, height = DEFAULT_VIEWPORT
    return Device(
        name=profile.name,
        user_agent=profile.user_agent or base.get("user_agent"),
        viewport=profile.viewport
        or _viewport(base.get("viewport"))
        or Viewport(width=width, height=height),
        device_scale_factor=float(
            profile.device_scale_factor or base.get("device_scale_factor") or 1
        ),
        is_mobile=_either(profile.is_mobile, base.get("is_mobile")),
        has_touch=_either(profile.has_touch, base.get("has_touch")),
        locale=profile.locale,
        timezone=profile.timezone,
        screen=_viewport(base.get("screen")),
        os=profile.os or os,
        browser=profile.browser or browser,
    )


def _either(override: bool | None, base: object) -> bool:
    return override if override is not None else bool(base)
