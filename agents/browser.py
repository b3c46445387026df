"""Finding and launching Chromium: the system browser first, else Playwright's managed one."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog
from playwright.async_api import Browser, Playwright
from playwright.async_api import Error as PlaywrightError

from agents.egress.launcher import seeded_launcher

log = structlog.get_logger("tb.agent")

CHROMIUM_ENV = "TB_CHROMIUM"
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Nothing may leave except through the egress proxy each context is given: no QUIC
    # (HTTP/3) over UDP, WebRTC only over proxied connections, no DNS prefetch from the
    # browser itself. Speculative loads are off through the profile (``PROFILE_PREFS``).
    "--disable-quic",
    "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--dns-prefetch-disable",
]
# Browser UI no flow uses. With it on, each browser context's window preloads its
# omnibox popup (a WebUI page) in a renderer process of its own: ~25 MiB PSS a flow,
# as much as a light page's own renderer. Passed only through the seeded launcher,
# which joins it with Playwright's own --disable-features (Chromium keeps one).
UNUSED_FEATURES = "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup"
INSTALL_HINT = (
    "apt-get install chromium (Debian/Ubuntu) or: python -m playwright install --with-deps chromium"
)


class BrowserMissing(Exception):
    """No Chromium could be launched; the message says what to install."""


def find_chromium() -> str | None:
    """The Chromium executable to use: ``$TB_CHROMIUM``, else a system install, else None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit
    for path in CHROMIUM_PATHS:
        if os.access(path, os.X_OK):
            return path
    for name in CHROMIUM_NAMES:
        if found := shutil.which(name):
            return found
    return None


def managed_chromium_installed() -> bool:
    """Whether ``playwright install chromium`` has put a browser in its cache."""
    cache = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or str(Path.home() / ".cache/ms-playwright")
    return any(Path(cache).glob("chromium-*"))


async def launch_chromium(playwright: Playwright, headless: bool = True) -> Browser:
    """Launch the system Chromium, falling back to Playwright's managed build; either
    starts with a profile that keeps speculative loads off (``agents.egress.launcher``)
    and without the browser UI no flow uses (``UNUSED_FEATURES``)."""
    launch = functools.partial(
        playwright.chromium.launch,
        headless=headless,
        # the runner decides what a stop signal means (it drains), not Playwright: a
        # Ctrl-C reaching the whole process group must not close the browser
        handle_sigint=False,
        handle_sigterm=False,
        handle_sighup=False,
    )

    async def start(executable: str) -> Browser:
        launcher = seeded_launcher(executable)
        joined = launcher != executable  # no launcher (no POSIX shell): Playwright's list stays
        args = [*CHROMIUM_ARGS, UNUSED_FEATURES] if joined else CHROMIUM_ARGS
        return await launch(executable_path=launcher, args=args)

    path = find_chromium()
    if path is not None:
        try:
            return await start(path)
        except PlaywrightError as err:
            log.warning("browser.launch_failed", executable=path, error=first_line(err))
    try:
        return await start(playwright.chromium.executable_path)
    except PlaywrightError as err:
        tried = (
            f"{path} and Playwright's managed Chromium" if path else "Playwright's managed Chromium"
        )
        raise BrowserMissing(
            f"no Chromium could be launched (tried {tried}: {first_line(err)}); install one: "
            + INSTALL_HINT
        ) from err


def first_line(err: BaseException) -> str:
    """Playwright errors carry a long call log after the first line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# -- which browsers this machine can launch ------------------------------------------

BROWSER_NAMES = ("chromium", "firefox", "webkit")
BrowserFinder = Callable[[str], str | None]  # browser name -> its executable, or None


async def playwright_executables() -> dict[str, str]:
    """Where this Playwright expects its managed browsers (whether installed or not).

    Only Playwright's own builds count for Firefox and WebKit: a distribution's
    Firefox (Debian's firefox-esr) is not a build Playwright can drive.
    """
    from playwright.async_api import async_playwright

    try:
        async with async_playwright() as playwright:
            return {name: getattr(playwright, name).executable_path for name in BROWSER_NAMES}
    except (PlaywrightError, OSError) as err:  # its driver does not start: none of its own
        log.warning("browser.playwright_unavailable", error=first_line(err))
        return {}


def installed_browsers(managed: Mapping[str, str]) -> BrowserFinder:
    """A finder over this machine: Chromium is the system one (as ``launch_chromium``
    prefers it), else Playwright's; Firefox and WebKit are Playwright's, when installed."""

    def find(name: str) -> str | None:
        if name == "chromium" and (system := find_chromium()) is not None:
            return system
        path = managed.get(name)
        return path if path and os.access(path, os.X_OK) else None

    return find


def available_browsers(find: BrowserFinder) -> dict[str, str]:
    """The browsers ``find`` has an executable for, each with that executable."""
    return {name: path for name in BROWSER_NAMES if (path := find(name)) is not None}
