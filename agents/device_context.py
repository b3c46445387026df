"""A flow's device: its profile resolved against the job's catalogue version, and the
browser context options that present it."""

from __future__ import annotations

from typing import Any

from agents.executor import FlowError
from schemas.device_catalogue import LEGACY_VERSION, ShippedCatalogues
from schemas.devices import DEFAULT_DEVICE, Device, DeviceProfile, resolve
from schemas.events import FlowDispatched

USER_AGENT_MARK = "TrafficBuster"


def device_for(item: FlowDispatched, profile: DeviceProfile, shipped: ShippedCatalogues) -> Device:
    """``profile`` (the flow's, from its plan) as the job's catalogue version has it.

    A runner that lacks that exact version (its number and content) fails the flow as
    retryable: another runner, of a newer package, may have it. A name the version does
    not hold (only a forged item could carry one) is not retryable."""
    if profile.name == DEFAULT_DEVICE:
        return resolve(profile, {})
    wanted = item.device_catalogue
    catalogue = shipped.get(LEGACY_VERSION) if wanted is None else shipped.exactly(wanted)
    if catalogue is None:
        version = LEGACY_VERSION if wanted is None else wanted.version
        raise FlowError(
            f"device_catalogue: version {version} is not shipped with this runner"
            f" (it has {shipped.describe()}); a runner that has it can take the flow",
            retryable=True,
        )
    try:
        return resolve(profile, catalogue.devices)
    except KeyError:
        raise FlowError(
            f"unknown_device: {profile.name} (catalogue version {catalogue.version})",
            retryable=False,
        ) from None


def identified(user_agent: str, version: str) -> str:
    """The User-Agent with the suffix site owners filter on (DESIGN invariant 5)."""
    return f"{user_agent} {USER_AGENT_MARK}/{version}"


def context_options(device: Device, browser_user_agent: str, version: str) -> dict[str, Any]:
    """``new_context`` options for ``device``; without a User-Agent of its own the
    device keeps the browser's. Every profile's User-Agent carries the suffix."""
    options: dict[str, Any] = {
        "user_agent": identified(device.user_agent or browser_user_agent, version),
        "viewport": {"width": device.viewport.width, "height": device.viewport.height},
        "device_scale_factor": device.device_scale_factor,
        "is_mobile": device.is_mobile,
        "has_touch": device.has_touch,
    }
    if device.screen is not None:
        options["screen"] = {"width": device.screen.width, "height": device.screen.height}
    if device.locale is not None:
        options["locale"] = device.locale
    if device.timezone is not None:
        options["timezone_id"] = device.timezone
    return options
