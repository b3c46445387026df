"""The device catalogue: shipped versions, the newest is the installed Playwright's; a
profile's overrides win, and its os and browser families come from its descriptor."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from playwright.async_api import async_playwright

from agents.device_context import context_options, device_for
from agents.executor import FlowError
from schemas.device_catalogue import (
    CatalogueFile,
    CatalogueVersion,
    DeviceCatalogue,
    ShippedCatalogues,
    content_sha256,
    render,
)
from schemas.devices import DeviceProfile, Viewport, resolve
from schemas.events import FlowDispatched
from schemas.families import os_of_user_agent
from scripts.refresh_devices import next_version, ship
from tests.device_catalogues import (
    IPHONE,
    IPHONE_V2_AGENT,
    NEW_PHONE,
    add_version_2,
    with_version_1,
)


def newest() -> DeviceCatalogue:
    found = ShippedCatalogues().newest()
    assert found is not None, "the package ships no device catalogue"
    return found


async def test_newest_shipped_catalogue_is_the_installed_playwrights_device_descriptors() -> None:
    async with async_playwright() as playwright:
        installed = {name: dict(d) for name, d in playwright.devices.items()}
    assert dict(newest().devices) == installed, "run python scripts/refresh_devices.py"


def test_every_shipped_version_is_as_the_script_writes_it() -> None:
    shipped = ShippedCatalogues()
    assert shipped.versions() and shipped.versions()[0] == 1
    for version in shipped.versions():
        path = shipped.directory / f"{version}.json"
        file = msgspec.json.decode(path.read_bytes(), type=CatalogueFile)
        assert file.version == version
        assert render(file) == path.read_text(), f"{path} was edited by hand"


def test_the_refresh_writes_the_next_version_and_never_over_one(tmp_path: Path) -> None:
    shipped = with_version_1(tmp_path)
    first = shipped.get(1)
    assert first is not None
    same = {name: dict(d) for name, d in first.devices.items()}
    assert next_version(shipped, same, "playwright x") is None
    changed = {"Only Phone": {"user_agent": "X", "viewport": {"width": 1, "height": 1}}}
    new = next_version(shipped, changed, "playwright 2.0")
    assert new is not None and (new.version, new.source) == (2, "playwright 2.0")
    ship(shipped, new)
    assert shipped.versions() == [1, 2]
    with pytest.raises(FileExistsError):
        ship(shipped, new)


def test_the_content_hash_ignores_layout(tmp_path: Path) -> None:
    shipped = with_version_1(tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    loaded = json.loads((shipped.directory / "1.json").read_text())
    (other / "1.json").write_text(json.dumps(loaded, indent=4) + "\r\n")
    first = shipped.get(1)
    assert first is not None
    assert ShippedCatalogues(other).exactly(first.ref) is not None
    assert shipped.exactly(CatalogueVersion(version=1, sha256="0" * 64)) is None


def test_a_version_added_while_running_is_seen(tmp_path: Path) -> None:
    shipped = with_version_1(tmp_path)
    assert shipped.versions() == [1]
    add_version_2(shipped)
    found = shipped.newest()
    assert found is not None and found.version == 2 and "Test Phone 2" in found.devices


def test_overrides_win_and_the_rest_comes_from_the_descriptor() -> None:
    devices = newest().devices
    pixel = devices["Pixel 7"]
    profile = DeviceProfile(name="Pixel 7", viewport=Viewport(width=500, height=900), locale="fr")
    device = resolve(profile, devices)
    assert device.viewport == Viewport(width=500, height=900)
    assert device.user_agent == pixel["user_agent"]
    assert device.device_scale_factor == pixel["device_scale_factor"]
    assert (device.is_mobile, device.has_touch, device.locale) == (True, True, "fr")
    assert resolve(DeviceProfile(name="Pixel 7", is_mobile=False), devices).is_mobile is False
    with pytest.raises(KeyError):
        resolve(DeviceProfile(name="No Such Phone"), devices)


@pytest.mark.parametrize(
    ("name", "families"),
    [
        ("iPhone 13", ("ios", "webkit")),
        ("iPad Mini", ("ios", "webkit")),
        ("Pixel 7", ("android", "chromium")),
        ("Desktop Firefox", ("windows", "firefox")),
        ("Desktop Safari", ("macos", "webkit")),
        ("Kindle Fire HDX", ("android", "webkit")),
        ("BlackBerry Z30", (None, "webkit")),
        ("Microsoft Lumia 550", (None, "chromium")),
        ("default", (None, None)),  # the runner's own browser
    ],
)
def test_families_come_from_the_descriptor(name: str, families: tuple[str, str]) -> None:
    device = resolve(DeviceProfile(name=name), newest().devices)
    assert (device.os, device.browser) == families


def test_named_families_win_over_the_descriptors() -> None:
    profile = DeviceProfile(name="iPhone 13", os="android", browser="chromium")
    device = resolve(profile, newest().devices)
    assert (device.os, device.browser) == ("android", "chromium")
    assert os_of_user_agent("Mozilla/5.0 (X11; Linux x86_64) Chrome/1") == "linux"


def test_every_descriptor_of_the_newest_version_resolves() -> None:
    catalogue = newest()
    for name in catalogue.names():
        device = resolve(DeviceProfile(name=name), catalogue.devices)
        assert device.name == name and device.viewport.width > 0


def test_every_profile_keeps_the_identifying_suffix() -> None:
    devices = newest().devices
    for name in ("default", "iPhone 13", "Desktop Firefox"):
        options = context_options(resolve(DeviceProfile(name=name), devices), "Browser/1", "1.2.3")
        assert options["user_agent"].endswith(" TrafficBuster/1.2.3")
    custom = DeviceProfile(user_agent="Custom/2", timezone="Asia/Jakarta")
    options = context_options(resolve(custom, devices), "Browser/1", "1.2.3")
    assert options["user_agent"] == "Custom/2 TrafficBuster/1.2.3"
    assert options["timezone_id"] == "Asia/Jakarta" and "locale" not in options


def test_a_profile_round_trips_without_its_unset_fields() -> None:
    profile = DeviceProfile(name="iPhone 13", has_touch=False, os="ios")
    encoded = msgspec.json.encode(profile)
    assert encoded == b'{"name":"iPhone 13","has_touch":false,"os":"ios"}'
    assert msgspec.json.decode(encoded, type=DeviceProfile) == profile
    with pytest.raises(msgspec.ValidationError, match="os"):
        msgspec.json.decode(b'{"name":"x","os":"beos"}', type=DeviceProfile)


# -- a runner resolves a flow's device against the job's exact version ------------------


def item(ref: CatalogueVersion | None) -> FlowDispatched:
    return FlowDispatched(
        id="e",
        at=datetime.now(UTC),
        actor="system",
        job_id="job_1",
        flow_id="job_1_0_0",
        attempt=1,
        target_index=0,
        url="http://a.test/",
        clicks=0,
        session_seconds=0,
        allowed_hosts=["a.test"],
        seed=1,
        device_catalogue=ref,
    )


def test_a_runner_resolves_against_the_items_version(tmp_path: Path) -> None:
    shipped = with_version_1(tmp_path)
    add_version_2(shipped)
    first, second = shipped.get(1), shipped.get(2)
    assert first is not None and second is not None
    iphone = DeviceProfile(name=IPHONE)
    assert device_for(item(second.ref), iphone, shipped).user_agent == IPHONE_V2_AGENT
    old = device_for(item(first.ref), iphone, shipped).user_agent
    assert old == first.devices[IPHONE]["user_agent"] != IPHONE_V2_AGENT
    # an item from before versions: version 1
    assert device_for(item(None), iphone, shipped).user_agent == old


def test_a_runner_without_the_version_fails_the_flow_for_another_to_take(tmp_path: Path) -> None:
    newer = with_version_1(tmp_path / "newer")
    second = CatalogueVersion(version=2, sha256=content_sha256(add_version_2(newer)))
    older = with_version_1(tmp_path / "older")
    with pytest.raises(FlowError, match="version 2 is not shipped with this runner") as err:
        device_for(item(second), DeviceProfile(name=IPHONE), older)
    assert err.value.retryable
    # the same number with other content is not that version either
    forged = CatalogueVersion(version=1, sha256="0" * 64)
    with pytest.raises(FlowError, match="version 1 is not shipped") as err:
        device_for(item(forged), DeviceProfile(name=IPHONE), older)
    assert err.value.retryable
    # the runner's own browser needs no catalogue
    assert device_for(item(second), DeviceProfile(), older).name == "default"
    first = older.get(1)
    assert first is not None
    with pytest.raises(FlowError, match="unknown_device") as err:
        device_for(item(first.ref), DeviceProfile(name=NEW_PHONE), older)
    assert not err.value.retryable
