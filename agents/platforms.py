"""What platform a runner may serve: its own operating system, and a browser it can launch.

A runner that advertised a platform it cannot launch would take work items and fail
every one of them, so it refuses to start instead, saying what is missing. Which
browsers are found comes from a finder (``agents.browser.available_browsers``), so the
rule is testable without the browsers installed.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import async_playwright

from agents.browser import BROWSER_NAMES, BrowserMissing, first_line, launch_chromium
from schemas.values import OsName, Platform

# The flow executor launches Chromium only: the browser flags that keep every byte on
# the egress path (WebRTC, QUIC, prefetch) are Chromium's. A Firefox or WebKit that
# Playwright has installed is found, and named when refused, but not served.
EXECUTOR_BROWSERS = frozenset({"chromium"})

INSTALL_HINTS = {
    "chromium": "apt-get install chromium, or: python -m playwright install --with-deps chromium",
    "firefox": "python -m playwright install --with-deps firefox",
    "webkit": "python -m playwright install --with-deps webkit",
}


class CannotServe(Exception):
    """The runner cannot serve the platform it was asked to; the message says why."""


def host_os(platform: str = sys.platform) -> OsName:
    """This machine's operating system, as platforms name it."""
    if platform.startswith("win"):
        return "windows"
    if platform == "darwin":
        return "macos"
    return "linux"


def servable_platforms(
    host: OsName, available: Mapping[str, str], drives: Collection[str] = EXECUTOR_BROWSERS
) -> list[Platform]:
    """Every platform this machine can serve: its own OS with each browser that is both
    installed and driven by the executor."""
    return [
        Platform(os=host, browser=name)  # type: ignore[arg-type]
        for name in BROWSER_NAMES
        if name in available and name in drives
    ]


def check_servable(
    wanted: Platform,
    host: OsName,
    available: Mapping[str, str],
    drives: Collection[str] = EXECUTOR_BROWSERS,
) -> str:
    """The executable that serves ``wanted``; ``CannotServe`` naming why there is none."""
    can = servable_platforms(host, available, drives)
    offer = ", ".join(f"{p.os}/{p.browser}" for p in can) or "nothing: no browser it can launch"
    if wanted.os != host:
        raise CannotServe(
            f"--os {wanted.os}: this machine runs {host}, and a runner serves only its own "
            f"operating system (this one can serve {offer})"
        )
    path = available.get(wanted.browser)
    if path is None:
        raise CannotServe(
            f"--browser {wanted.browser}: no {wanted.browser} this runner can launch is "
            f"installed (install it: {INSTALL_HINTS[wanted.browser]}); this machine can "
            f"serve {offer}"
        )
    if wanted.browser not in drives:
        raise CannotServe(
            f"--browser {wanted.browser}: found {path}, but flows run in Chromium only for "
            f"now (the egress guard's browser settings are Chromium's); this machine can "
            f"serve {offer}"
        )
    return path


async def launched_browser_version(browser: str) -> str:
    """Launch the browser the way the executor does and return the version it reports.

    Proves the browser starts before the runner takes any work: one that is found but
    does not launch (a missing library, a broken install) is ``CannotServe``.
    """
    async with async_playwright() as playwright:
        try:
            if browser == "chromium":
                launched = await launch_chromium(playwright, headless=True)
            else:  # only Playwright's own builds of the others
                launched = await getattr(playwright, browser).launch(headless=True)
        except (BrowserMissing, PlaywrightError) as err:
            raise CannotServe(f"--browser {browser}: {first_line(err)}") from err
        try:
            return str(launched.version)
        finally:
            await launched.close()
