"""What a ``tb runner`` advertises: its labels, its capacity, and a platform it can
serve (checked before it connects, so a runner never takes work it would fail)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import structlog

from schemas.labels import MAX_LABELS, BadLabel, parse_labels, split_label_list
from schemas.values import OsName, Platform

log = structlog.get_logger("tb.cli")

LABELS_ENV = "TB_RUNNER_LABELS"
SLOTS_ENV = "TB_RUNNER_SLOTS"
NO_BROWSER_SLOTS = 2  # a no-op executor launches no browser: the machine says nothing
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


def runner_capacity(given: int | None, *, browser: bool = True) -> int:
    """The flows a runner runs at once: ``--slots``, else ``TB_RUNNER_SLOTS``, else
    derived from this machine (``agents.capacity``); logged with where it came from."""
    from agents.capacity import BASE_BYTES, FLOWS_PER_CORE, MIB, PER_FLOW_BYTES, this_machine

    if given is not None:
        log.info("Capacity", slots=given, source="--slots")
        return given
    raw = os.environ.get(SLOTS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise SystemExit(f"{SLOTS_ENV}: must be a whole number, at least 1 (got {raw!r})")
        log.info("Capacity", slots=int(raw), source=SLOTS_ENV)
        return int(raw)
    if not browser:
        log.info("Capacity", slots=NO_BROWSER_SLOTS, source="default without a browser")
        return NO_BROWSER_SLOTS
    machine = this_machine()
    log.info(
        "Capacity",
        slots=machine.capacity,
        source="derived from this machine",
        rule=f"min((memory - {BASE_BYTES // MIB} MiB) / {PER_FLOW_BYTES // MIB} MiB, "
        f"{FLOWS_PER_CORE} x cores), at least 1",
        memory_mib=None if machine.memory_bytes is None else machine.memory_bytes // MIB,
        memory_from=machine.memory_source,
        cores=machine.cores,
        cores_from=machine.cores_source,
    )
    return machine.capacity


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
