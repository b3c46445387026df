"""The device catalogue is the installed Playwright's, and a profile's overrides win."""

from __future__ import annotations

import msgspec
from playwright.async_api import async_playwright

from agents.device_context import context_options
from schemas.devices import DeviceProfile, Viewport, catalogue, resolve
from scripts.refresh_devices import render


async def test_catalogue_is_the_installed_playwrights_device_descriptors() -> None:
    async with async_playwright() as playwright:
        installed = {name: dict(d) for name, d in playwright.devices.items()}
    assert catalogue() == installed, "run python scripts/refresh_devices.py"
    assert render(installed) == render(catalogue())


def test_overrides_win_and_the_rest_comes_from_the_descriptor() -> None:
    pixel = catalogue()["Pixel 7"]
    profile = DeviceProfile(name="Pixel 7", viewport=Viewport(width=500, height=900), locale="fr")
    device = resolve(profile)
    assert device.viewport == Viewport(width=500, height=900)
    assert device.user_agent == pixel["user_agent"]
    assert device.device_scale_factor == pixel["device_scale_factor"]
    assert (device.is_mobile, device.has_touch, device.locale) == (True, True, "fr")
    assert resolve(DeviceProfile(name="Pixel 7", is_mobile=False)).is_mobile is False


def test_every_profile_keeps_the_identifying_suffix() -> None:
    for name in ("default", "iPhone 13", "Desktop Firefox"):
        options = context_options(resolve(DeviceProfile(name=name)), "Browser/1", "1.2.3")
        assert options["user_agent"].endswith(" TrafficBuster/1.2.3")
    custom = DeviceProfile(user_agent="Custom/2", timezone="Asia/Jakarta")
    options = context_options(resolve(custom), "Browser/1", "1.2.3")
    assert options["user_agent"] == "Custom/2 TrafficBuster/1.2.3"
    assert options["timezone_id"] == "Asia/Jakarta" and "locale" not in options


def test_a_profile_round_trips_without_its_unset_fields() -> None:
    profile = DeviceProfile(name="iPhone 13", has_touch=False)
    encoded = msgspec.json.encode(profile)
    assert encoded == b'{"name":"iPhone 13","has_touch":false}'
    assert msgspec.json.decode(encoded, type=DeviceProfile) == profile
