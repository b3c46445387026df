"""A headed runner: with no display it starts its own Xvfb, and its browser is not the
headless build (the site sees a Chrome User-Agent, not HeadlessChrome)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import pytest

from agents.browser import find_chromium, managed_chromium_installed
from engine.bus import Bus
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import embedded
from tests.sites import recording_site

pytestmark = pytest.mark.timeout(120)
NO_XVFB = "no Xvfb: apt-get install xvfb (./dev up --headed installs it)"


def without_xvfb(env: Mapping[str, str]) -> Literal["skip", "fail"]:
    """As with a missing Chromium: a developer's machine skips, CI (CI=true) fails."""
    return "fail" if env.get("CI", "").lower() in ("true", "1") else "skip"


@pytest.fixture
def xvfb_and_chromium() -> None:
    missing = [
        what
        for what, there in (
            (NO_XVFB, shutil.which("Xvfb") is not None),
            ("no Chromium", find_chromium() is not None or managed_chromium_installed()),
        )
        if not there
    ]
    if not missing:
        return
    if without_xvfb(os.environ) == "fail":
        pytest.fail(f"{'; '.join(missing)} (CI=true: the headed test must run)", pytrace=False)
    pytest.skip("; ".join(missing))


def test_missing_xvfb_skips_locally_and_fails_in_ci() -> None:
    assert without_xvfb({}) == "skip"
    assert without_xvfb({"CI": "true"}) == "fail"


PAGES = {"/": "<html><body><h1>hello</h1><a href='/a'>a</a></body></html>"}


@pytest.mark.slow  # a runner process with its own Xvfb and browser
@pytest.mark.usefixtures("xvfb_and_chromium")
async def test_headed_runner_without_a_display_runs_its_flow_under_xvfb(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    env.update(TB_ACK_WAIT="3", TB_PRESENCE_TTL="3", TB_LOG_LEVEL="info")
    with recording_site(pages=PAGES) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)  # the consent covers the site's port
            runner = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "runner", "--nats-url", nats_server.url,
                "--headed", "--slots", "1",
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            tb.procs.append(runner)
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=1)], session_seconds=0.5
            )
            view = await tb.wait_terminal(job_id, timeout=90)
            runner.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(runner.wait(), 30)
            assert runner.stderr is not None
            said = [
                json.loads(line)
                for line in (await runner.stderr.read()).splitlines()
                if line.startswith(b"{")
            ]
    assert code == 0
    assert view.status == "completed" and view.flows_done == 1
    agents = {h["user-agent"] for path, h in site.requests if h.get("x-trafficbuster") == job_id}
    assert agents and not any("HeadlessChrome" in a for a in agents), agents
    xvfb = [line for line in said if line["event"] == "Started Xvfb for the headed browser"]
    assert len(xvfb) == 1 and xvfb[0]["display"].startswith(":")
