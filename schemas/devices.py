"""Device profiles: Playwright's device descriptors, named by a job, with its overrides.

The catalogue (``devices.json``) is the installed Playwright's ``playwright.devices``,
written by ``scripts/refresh_devices.py``; a test fails when the two disagree. A
profile names a descriptor (or ``default``: the runner's browser as it is) and may
override any of its fields. Names are checked where a job is created, not where an
event is decoded: a descriptor that a later Playwright drops must not make an old
job's events undecodable.
"""

from __future__ import annotations

import functools
import json
import zoneinfo
from importlib import resources
from typing import Annotated, Any

import msgspec

DEFAULT_DEVICE = "default"  # the runner's browser as launched: its own User-Agent, 1280x800
DEFAULT_VIEWPORT = (1280, 800)

Pixels = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
LOCALE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}$"


class Viewport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    width: Pixels
    height: Pixels


class DeviceProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A device a flow presents as: a Playwright descriptor by name, fields overridden."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = DEFAULT_DEVICE
    user_agent: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    viewport: Viewport | None = None
    device_scale_factor: Annotated[float, msgspec.Meta(ge=0.5, le=5)] | None = None
    is_mobile: bool | None = None
    has_touch: bool | None = None
    locale: Annotated[str, msgspec.Meta(max_length=40, pattern=LOCALE_PATTERN)] | None = None
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None

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
    """A profile resolved against the catalogue: what a browser context is given.

    ``user_agent`` ``None`` keeps the browser's own (still suffixed by the runner)."""

    name: str
    user_agent: str | None
    viewport: Viewport
    device_scale_factor: float
    is_mobile: bool
    has_touch: bool
    locale: str | None
    timezone: str | None
    screen: Viewport | None = None


@functools.cache
def time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@functools.cache
def catalogue() -> dict[str, dict[str, Any]]:
    """Playwright's device descriptors by name."""
    text = resources.files("schemas").joinpath("devices.json").read_text()
    loaded: dict[str, dict[str, Any]] = json.loads(text)
    return loaded


def device_names() -> list[str]:
    return [DEFAULT_DEVICE, *sorted(catalogue())]


def unknown_device(name: str) -> bool:
    return name != DEFAULT_DEVICE and name not in catalogue()


def _viewport(value: Any) -> Viewport | None:
    if not isinstance(value, dict):
        return None
    return Viewport(width=int(value["width"]), height=int(value["height"]))


def resolve(profile: DeviceProfile) -> Device:
    """The profile's descriptor with its overrides on top; ``KeyError`` for an unknown name."""
    if profile.name == DEFAULT_DEVICE:
        base: dict[str, Any] = {}
    else:
        base = catalogue()[profile.name]
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
        is_mobile=profile.is_mobile
        if profile.is_mobile is not None
        else bool(base.get("is_mobile")),
        has_touch=profile.has_touch
        if profile.has_touch is not None
        else bool(base.get("has_touch")),
        locale=profile.locale,
        timezone=profile.timezone,
        screen=_viewport(base.get("screen")),
    )


def _either(override: bool | None, base: object) -> bool:
    return override if override is not None else bool(base)
