"""Write schemas/devices.json from the installed Playwright's device descriptors.

Run after upgrading Playwright (``python scripts/refresh_devices.py``); a test fails
while the catalogue and the installed Playwright disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from playwright.sync_api import sync_playwright

CATALOGUE = Path(__file__).resolve().parent.parent / "schemas" / "devices.json"


def installed_descriptors() -> dict[str, dict[str, object]]:
    with sync_playwright() as playwright:
        return {name: dict(d) for name, d in sorted(playwright.devices.items())}


def render(descriptors: dict[str, dict[str, object]]) -> str:
    """One device a line, so an upgrade's changes read well in a diff."""
    lines = [
        f"  {json.dumps(name)}: {json.dumps(d, sort_keys=True)}"
        for name, d in sorted(descriptors.items())
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    CATALOGUE.write_text(render(installed_descriptors()))
    print(f"wrote {CATALOGUE}")
