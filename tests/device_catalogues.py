"""Catalogue directories for tests: the shipped version 1, and a version 2 that differs
from it (a new phone, a device gone, another iPhone 13 User-Agent)."""

from __future__ import annotations

import shutil
from pathlib import Path

from schemas.device_catalogue import CATALOGUE_DIR, CatalogueFile, ShippedCatalogues, render

IPHONE = "iPhone 13"
IPHONE_V2_AGENT = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) Version-Two/2.0"
NEW_PHONE = "Test Phone 2"  # only in version 2
GONE = "Nokia N9"  # only in version 1


def with_version_1(directory: Path) -> ShippedCatalogues:
    """``directory`` holding the package's version 1 only."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(CATALOGUE_DIR / "1.json", directory / "1.json")
    return ShippedCatalogues(directory)


def add_version_2(shipped: ShippedCatalogues) -> CatalogueFile:
    """Ship version 2 into ``shipped``'s directory (as a package upgrade would)."""
    first = shipped.get(1)
    assert first is not None
    devices = {name: dict(d) for name, d in first.devices.items() if name != GONE}
    devices[IPHONE] = {**devices[IPHONE], "user_agent": IPHONE_V2_AGENT}
    devices[NEW_PHONE] = {**devices["Pixel 7"], "user_agent": "Mozilla/5.0 (Linux; Android 16)"}
    file = CatalogueFile(version=2, source="playwright 9.9.9", devices=devices)
    (shipped.directory / "2.json").write_text(render(file))
    return file
