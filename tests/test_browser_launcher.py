"""How Chromium is started: the seeded launcher's profile and switches, and what a
browser context costs in processes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from agents.browser import UNUSED_FEATURES, launch_chromium
from agents.egress.launcher import PROFILE_PREFS, seeded_launcher
from benchmarks.processes import descendants, is_browser
from tests.test_executor import chromium, needs_chromium

__all__ = ["chromium"]  # the fixture shared with the executor's tests

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the launcher is a POSIX shell script")


def recording_executable(tmp_path: Path) -> tuple[str, Path]:
    """A stand-in browser that writes the arguments it was started with, one a line."""
    out = tmp_path / "argv"
    executable = tmp_path / "browser"
    executable.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {out}\n')
    executable.chmod(stat.S_IRWXU)
    return str(executable), out


def test_the_launcher_seeds_the_profile_and_joins_the_disabled_features(tmp_path: Path) -> None:
    executable, out = recording_executable(tmp_path)
    profile = tmp_path / "profile dir"
    argv = [
        "--disable-features=A,B",
        "--headless",
        f"--user-data-dir={profile}",
        "--blink-settings=x=1 y",
        "--disable-features=C",
        "--enable-features=D",
    ]
    assert os.spawnv(os.P_WAIT, seeded_launcher(executable), ["browser", *argv]) == 0

    assert out.read_text().splitlines() == [
        "--headless",
        f"--user-data-dir={profile}",
        "--blink-settings=x=1 y",
        "--enable-features=D",
        "--disable-features=A,B,C",
    ]
    assert json.loads((profile / "Default/Preferences").read_text()) == PROFILE_PREFS


def test_without_disabled_features_the_arguments_pass_unchanged(tmp_path: Path) -> None:
    executable, out = recording_executable(tmp_path)
    argv = ["--headless", "--no-sandbox", ""]
    assert os.spawnv(os.P_WAIT, seeded_launcher(executable), ["browser", *argv]) == 0
    assert out.read_text().splitlines() == argv


def browser_switches(name: str) -> list[str]:
    """Every value of the switch ``name`` on the command line of this process's browser."""
    for pid in descendants(os.getpid()):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().split()
        if is_browser(pid) and not any(a.startswith("--type=") for a in argv):
            return [a.partition("=")[2] for a in argv if a.startswith(f"--{name}=")]
    raise AssertionError("no browser process found")


@needs_chromium
async def test_a_context_opens_no_browser_ui_and_playwrights_features_stay_off() -> None:
    async with async_playwright() as playwright:
        browser = await launch_chromium(playwright)
        try:
            (disabled,) = browser_switches("disable-features")
            features = disabled.split(",")
            assert set(UNUSED_FEATURES.partition("=")[2].split(",")) <= set(features)
            assert {"MediaRouter", "OptimizationHints"} <= set(features)  # Playwright's own

            context = await browser.new_context()
            await context.new_page()
            cdp = await browser.new_browser_cdp_session()
            targets = (await cdp.send("Target.getTargets"))["targetInfos"]
            # the page alone: no omnibox popup (a WebUI page with a renderer of its own)
            assert [t["type"] for t in targets] == ["page"], targets
        finally:
            await browser.close()
