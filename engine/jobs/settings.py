"""The rules of a job's settings that one field's type cannot say: they look at the
device catalogue, at other settings or at the job's targets. Checked when a job is
created (422 naming the setting); a setting's own shape is its type's (400)."""

from __future__ import annotations

from collections.abc import Set

from engine.errors import Rejected
from schemas.devices import unknown_device
from schemas.values import JobSettings

DEVICE_RULE = (
    "must be 'default' or the name of a Playwright device descriptor"
    " (e.g. 'iPhone 13', 'Pixel 7', 'Desktop Chrome'; GET /api/v1/devices lists them)"
)


def check_settings(settings: JobSettings, hosts: Set[str]) -> None:
    """Raise ``Rejected`` naming the first setting that breaks a rule; ``hosts``: the
    job's target hosts."""
    for i, device in enumerate(settings.devices):
        if unknown_device(device.name):
            raise Rejected(f"settings.devices[{i}].name", f"{DEVICE_RULE} (got {device.name!r})")
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
