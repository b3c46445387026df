"""Browser context options that present a flow's device profile."""

from __future__ import annotations

from typing import Any

from schemas.devices import Device

USER_AGENT_MARK = "TrafficBuster"


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
