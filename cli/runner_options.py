"""What a ``tb runner`` advertises: its labels, and a platform it can serve (checked
before it connects, so a runner never takes work it would fail)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from schemas.labels import MAX_LABELS, BadLabel, parse_labels, split_label_list
from schemas.values import OsName, Platform

LABELS_ENV = "TB_RUNNER_LABELS"
CANNOT_SERVE_EXIT = 3  # the runner cannot launch the platform it was asked to serve


def runner_labels(given: Mapping[str, str]) -> dict[str, str]:
    """``TB_RUNNER_LABELS`` (``k=v,k2=v2``), then ``--label`` on top of it."""
    try:
        labels = parse_labels(split_label_list(os.environ.get(LABELS_ENV, "")))
    except BadLabel as err:
        raise SystemExit(f"{LABELS_ENV}: {err}") from None
    labels.update(given)
    if len(labels) > MAX_LABELS:
        raise SystemExit(
            f"--label and {LABELS_ENV}: at most {MAX_LABELS} labels (got {len(labels)})"
        )
    return labels


def runner_platform(os_name: str | None, browser: str) -> Platform:
    from agents.platforms import host_os

    chosen: OsName = os_name or host_os()  # type: ignore[assignment]
    return Platform(os=chosen, browser=browser)  # type: ignore[arg-type]


async def launchable_browser_version(platform: Platform) -> str:
    """The version of the browser this runner will launch for ``platform``; exits with
    ``CANNOT_SERVE_EXIT``, saying why, when it cannot serve it.

    The check launches headless even for a headed runner: it is the same executable, and
    a display for a headed one may only be there once the executor starts."""
    from agents.browser import available_browsers, installed_browsers, playwright_executables
    from agents.platforms import (
        CannotServe,
        check_servable,
        host_os,
        launched_browser_version,
    )

    try:
        found = available_browsers(installed_browsers(await playwright_executables()))
        check_servable(platform, host_os(), found)
        return await launched_browser_version(platform.browser)
    except CannotServe as err:
        print(f"tb runner: cannot serve {platform.os}/{platform.browser}: {err}", file=sys.stderr)
        raise SystemExit(CANNOT_SERVE_EXIT) from None
