"""Ship the installed Playwright's device descriptors as the next device catalogue version.

Run after upgrading Playwright (``python scripts/refresh_devices.py``): when its
descriptors differ from the newest shipped version, it writes
``schemas/device_catalogues/<newest + 1>.json``; a version once shipped is never
rewritten (jobs were created with it). A test fails while the newest shipped version
and the installed Playwright disagree. Systems take the new version when an admin asks
(``POST /api/v1/devices/catalogue/update``).
"""

from __future__ import annotations

from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from schemas.device_catalogue import CatalogueFile, ShippedCatalogues, render


def installed_descriptors() -> dict[str, dict[str, Any]]:
    with sync_playwright() as playwright:
        return {name: dict(d) for name, d in sorted(playwright.devices.items())}


def source() -> str:
    return f"playwright {installed_version('playwright')}"


def next_version(
    shipped: ShippedCatalogues, descriptors: dict[str, dict[str, Any]], source: str
) -> CatalogueFile | None:
    """The version to ship for ``descriptors``, or ``None`` when the newest shipped one
    already holds them."""
    newest = shipped.newest()
    if newest is not None and dict(newest.devices) == descriptors:
        return None
    number = newest.version + 1 if newest is not None else 1
    return CatalogueFile(version=number, source=source, devices=descriptors)


def ship(shipped: ShippedCatalogues, file: CatalogueFile) -> Path:
    path = shipped.directory / f"{file.version}.json"
    with path.open("x") as out:  # never over a shipped version
        out.write(render(file))
    return path


if __name__ == "__main__":
    shipped = ShippedCatalogues()
    new = next_version(shipped, installed_descriptors(), source())
    if new is None:
        print(f"the newest shipped catalogue already holds {source()}'s descriptors")
    else:
        print(f"wrote {ship(shipped, new)}")
