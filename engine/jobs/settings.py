"""The rules of a job's settings that one field's type cannot say: they look at the
device catalogue, at the job's platform, at other settings or at the job's targets.
Checked when a job is created (422 naming the setting); a setting's own shape is its
type's (400)."""

from __future__ import annotations

from collections.abc import Set
from typing import get_args

from engine.errors import Rejected
from schemas.device_catalogue import CatalogueVersion, DeviceCatalogue
from schemas.devices import DEFAULT_DEVICE
from schemas.families import OsName
from schemas.values import JobSettings, Platform

DEVICE_RULE = (
    "must be 'default' or the name of a Playwright device descriptor of device catalogue"
    " version {version} (e.g. 'iPhone 13', 'Pixel 7', 'Desktop Chrome'; GET /api/v1/devices"
    " lists them)"
)
RUNNER_OSES: frozenset[str] = frozenset(get_args(OsName))


def check_settings(
    settings: JobSettings,
    hosts: Set[str],
    catalogue: DeviceCatalogue | None = None,
    platform: Platform = Platform(),
    catalogue_ref: CatalogueVersion | None = None,
) -> None:
    """Raise ``Rejected`` naming the first setting that breaks a rule; ``hosts``: the
    job's target hosts; ``catalogue``: the device catalogue the job is created with
    (``None``: this process lacks it, ``catalogue_ref`` says which it is)."""
    for i, device in enumerate(settings.devices):
        field = f"settings.devices[{i}]"
        if device.name != DEFAULT_DEVICE:
            if catalogue is None:
                which = f"version {catalogue_ref.version}" if catalogue_ref else "none"
                raise Rejected(
                    f"{field}.name",
                    f"cannot be checked: the device catalogue in use ({which}) is not"
                    " shipped with this server; upgrade it, or name 'default'",
                )
            if not catalogue.knows(device.name):
                rule = DEVICE_RULE.format(version=catalogue.version)
                raise Rejected(f"{field}.name", f"{rule} (got {device.name!r})")
        _check_families(field, device.os, device.browser, platform)
    if settings.platform_switching and len(settings.devices) < 2:
        raise Rejected(
            "settings.platform_switching",
            f"needs at least two devices to switch between (got {len(settings.devices)})",
        )
    if settings.external_click_ratio > 0 and len(hosts) < 2:
        raise Rejected(
            "settings.external_click_ratio",
            "an external click goes to another consented host of the job: needs targets"
            f" on at least two hosts (got {len(hosts)})",
        )


def _check_families(field: str, os: str | None, browser: str | None, platform: Platform) -> None:
    """A family a profile names is a requirement on where its flows run: the job's
    platform must be it. (A descriptor's own families only describe it: Playwright
    presents any descriptor in the runner's browser.) Phones' and tablets' systems
    (android, ios) run on no runner: they are always presented."""
    if browser is not None and browser != platform.browser:
        raise Rejected(
            f"{field}.browser",
            f"must be the job's platform browser: this job runs in {platform.browser}"
            f" (got {browser!r}; create it with platform.browser {browser!r})",
        )
    if os in RUNNER_OSES and os != platform.os:
        raise Rejected(
            f"{field}.os",
            f"a desktop system must be the job's platform os: this job runs on"
            f" {platform.os} (got {os!r}; create it with platform.os {os!r})",
        )
