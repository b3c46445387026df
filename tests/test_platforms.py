"""Which platforms a runner advertises and serves: its own OS, a browser it can launch;
its labels; and the runner counts the read model folds from the flow events."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from agents.browser import available_browsers, installed_browsers, playwright_executables
from agents.platforms import CannotServe, check_servable, host_os, servable_platforms
from agents.presence import Load, Presence
from engine.bus import Bus, BusConfig
from projections.queries import list_runners
from projections.read_model import apply_batch, open_read_model
from schemas import subjects
from schemas.events import (
    Envelope,
    FlowDone,
    FlowFailed,
    RunnerRegistered,
    TbEvent,
    decode_event,
    encode_event,
)
from schemas.labels import BadLabel, parse_labels, split_label_list
from schemas.presence import RunnerPresence
from schemas.values import Platform
from tests.conftest import NatsServer

TB = [sys.executable, "-m", "cli.main"]
LINUX_CHROMIUM = Platform(os="linux", browser="chromium")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def finder(found: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda name: found.get(name)


# -- which browsers a machine can launch ----------------------------------------------


def test_available_browsers_are_those_the_finder_finds_in_a_fixed_order() -> None:
    found = {"webkit": "/pw/webkit", "chromium": "/usr/bin/chromium"}
    assert available_browsers(finder(found)) == found
    assert list(available_browsers(finder(found))) == ["chromium", "webkit"]
    assert available_browsers(finder({})) == {}


def executable(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_the_machine_finder_takes_the_system_chromium_first_and_playwright_builds_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = executable(tmp_path / "usr/bin/chromium")
    managed = {
        "chromium": executable(tmp_path / "pw/chromium-1/chrome"),
        "firefox": executable(tmp_path / "pw/firefox-1/firefox"),
        "webkit": str(tmp_path / "pw/webkit-1/pw_run.sh"),  # not installed
    }
    monkeypatch.setenv("TB_CHROMIUM", system)
    assert available_browsers(installed_browsers(managed)) == {
        "chromium": system,
        "firefox": managed["firefox"],
    }
    # no system Chromium anywhere: Playwright's own build serves
    monkeypatch.delenv("TB_CHROMIUM")
    monkeypatch.setattr("agents.browser.CHROMIUM_PATHS", ())
    monkeypatch.setattr("agents.browser.CHROMIUM_NAMES", ())
    assert available_browsers(installed_browsers(managed))["chromium"] == managed["chromium"]
    # a distribution's Firefox on the PATH is no build Playwright drives: never found
    monkeypatch.setenv("PATH", str(Path(executable(tmp_path / "bin/firefox")).parent))
    assert "firefox" not in available_browsers(installed_browsers({}))
    # a managed path that is not executable does not count
    os.chmod(managed["firefox"], 0o644)
    assert "firefox" not in available_browsers(installed_browsers(managed))


# -- what a runner may serve ----------------------------------------------------------


def test_a_machine_serves_its_own_os_with_each_browser_it_has_and_the_executor_drives() -> None:
    everything = {"chromium": "/c", "firefox": "/f", "webkit": "/w"}
    assert servable_platforms("linux", everything) == [LINUX_CHROMIUM]
    assert servable_platforms("macos", everything, drives=("chromium", "webkit")) == [
        Platform(os="macos", browser="chromium"),
        Platform(os="macos", browser="webkit"),
    ]
    assert servable_platforms("linux", {"firefox": "/f"}) == []


def test_check_servable_returns_the_executable_or_says_what_is_missing() -> None:
    assert check_servable(LINUX_CHROMIUM, "linux", {"chromium": "/usr/bin/chromium"}) == (
        "/usr/bin/chromium"
    )
    with pytest.raises(CannotServe, match=r"--os windows: this machine runs linux") as err:
        check_servable(Platform(os="windows"), "linux", {"chromium": "/c"})
    assert "can serve linux/chromium" in str(err.value)
    with pytest.raises(CannotServe, match=r"--browser firefox: no firefox") as err:
        check_servable(Platform(browser="firefox"), "linux", {"chromium": "/c"})
    assert "python -m playwright install --with-deps firefox" in str(err.value)
    with pytest.raises(CannotServe, match=r"found /pw/webkit, but flows run in Chromium only"):
        check_servable(Platform(browser="webkit"), "linux", {"webkit": "/pw/webkit"})
    with pytest.raises(CannotServe, match=r"can serve nothing: no browser it can launch"):
        check_servable(LINUX_CHROMIUM, "linux", {})


@pytest.mark.parametrize(
    ("name", "os_name"),
    [("linux", "linux"), ("darwin", "macos"), ("win32", "windows"), ("freebsd14", "linux")],
)
def test_host_os_names_the_machine_as_platforms_do(name: str, os_name: str) -> None:
    assert host_os(name) == os_name


def test_the_runner_refuses_a_browser_it_cannot_launch_before_connecting() -> None:
    # Playwright cannot install Firefox on this machine (the wrong-OS refusal is the same
    # path, shown by check_servable above); nothing listens on port 1: the refusal comes
    # first, with its own exit code
    result = subprocess.run(
        [*TB, "runner", "--nats-url", "nats://127.0.0.1:1", "--browser", "firefox"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "cannot serve linux/firefox: --browser firefox" in result.stderr


@pytest.mark.slow
def test_runner_os_and_browser_come_from_the_env_names_runners_already_use() -> None:
    def runner(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TB, "runner", "--nats-url", "nats://127.0.0.1:1", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    # safari is Playwright's webkit, refused here as a browser this machine cannot launch
    result = runner({"RUNNER_BROWSER": "safari"})
    assert result.returncode == 3 and "cannot serve linux/webkit" in result.stderr
    result = runner({"RUNNER_OS": "windows"})
    assert result.returncode == 3 and "cannot serve windows/chromium: --os windows" in (
        result.stderr
    )
    # the flag wins over the environment
    result = runner({"RUNNER_BROWSER": "chrome"}, "--browser", "firefox")
    assert result.returncode == 3 and "linux/firefox" in result.stderr
    for name, value in (("RUNNER_OS", "beos"), ("RUNNER_BROWSER", "lynx")):
        result = runner({name: value})
        assert result.returncode != 0 and f"{name}: must be one of" in result.stderr


def test_bad_labels_are_refused_naming_where_they_came_from() -> None:
    result = subprocess.run(
        [*TB, "runner", "--nats-url", "nats://127.0.0.1:1", "--label", "bad key=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--label" in result.stderr and "key must be" in result.stderr
    result = subprocess.run(
        [*TB, "runner", "--nats-url", "nats://127.0.0.1:1", "--executor", "noop"],
        capture_output=True,
        text=True,
        env={**os.environ, "TB_RUNNER_LABELS": "region=eu,oops"},
        timeout=30,
    )
    assert result.returncode == 1 and "TB_RUNNER_LABELS: 'oops' must be key=value" in result.stderr


# -- labels -----------------------------------------------------------------------------


def test_labels_parse_later_ones_win_and_the_rules_are_named() -> None:
    assert parse_labels(["region=eu", "tier=gold", "region=us", "note=a=b", "empty="]) == {
        "region": "us",
        "tier": "gold",
        "note": "a=b",
        "empty": "",
    }
    assert split_label_list(" region=eu, ,tier=gold,") == ["region=eu", "tier=gold"]
    for bad, rule in (
        ("novalue", "must be key=value"),
        ("=x", "key must be"),
        ("a.b c=x", "key must be"),
        ("k=" + "v" * 201, "at most 200 characters"),
        ("k=a\nb", "without control characters"),
    ):
        with pytest.raises(BadLabel, match=rule):
            parse_labels([bad])
    with pytest.raises(BadLabel, match="at most 32 labels"):
        parse_labels([f"k{n}=v" for n in range(33)])


def test_registration_and_presence_carry_labels_and_browser_version_older_ones_decode() -> None:
    event = RunnerRegistered(
        id="e1",
        at=T0,
        actor="runner_a",
        runner_id="runner_a",
        platform=LINUX_CHROMIUM,
        slots=4,
        browser_version="156.0.8078.114",
        labels={"region": "eu"},
    )
    assert decode_event(encode_event(event)) == event
    older = b'{"type":"RunnerRegistered","id":"e1","at":"2026-01-01T00:00:00Z","actor":"r",'
    older += b'"runner_id":"r","platform":{"os":"linux","browser":"chromium"},"slots":1}'
    decoded = decode_event(older)
    assert isinstance(decoded, RunnerRegistered)
    assert (decoded.browser_version, decoded.labels) == ("", {})
    with pytest.raises(msgspec.ValidationError, match="labels"):
        decode_event(older.replace(b'"slots":1', b'"slots":1,"labels":{"bad key":"x"}'))
    presence = msgspec.json.decode(
        b'{"runner_id":"r","os":"linux","browser":"chromium","slots":2}', type=RunnerPresence
    )
    assert (presence.labels, presence.browser_version, presence.started_at) == ({}, "", "")


# -- counts per runner, folded from the log -----------------------------------------------


def envelopes(*events: TbEvent) -> list[Envelope]:
    return [Envelope(seq=n, subject="tb.x", event=e) for n, e in enumerate(events, start=1)]


def registered(runner_id: str, n: int, **fields: object) -> RunnerRegistered:
    return RunnerRegistered(
        id=f"reg{n}",
        at=T0 + timedelta(seconds=n),
        actor=runner_id,
        runner_id=runner_id,
        platform=LINUX_CHROMIUM,
        slots=2,
        **fields,  # type: ignore[arg-type]
    )


def ended(kind: type[FlowDone] | type[FlowFailed], n: int, runner_id: str) -> FlowDone | FlowFailed:
    common = {
        "id": f"end{n}",
        "at": T0 + timedelta(seconds=n),
        "actor": runner_id or "system",
        "job_id": "job_1",
        "flow_id": f"job_1_f{n}",
        "attempt": 1,
        "target_index": 0,
        "runner_id": runner_id,
    }
    if kind is FlowDone:
        return FlowDone(**common)  # type: ignore[arg-type]
    return FlowFailed(reason="http_500", **common)  # type: ignore[arg-type]


async def test_runner_counts_are_the_flow_runs_it_reported_since_it_last_registered(
    tmp_path: Path,
) -> None:
    db = await open_read_model(tmp_path / "read.db")
    try:
        await apply_batch(
            db,
            envelopes(
                registered("runner_a", 1, labels={"region": "eu"}, browser_version="156.0"),
                ended(FlowDone, 2, "runner_a"),
                ended(FlowDone, 3, "runner_a"),
                ended(FlowFailed, 4, "runner_a"),
                ended(FlowFailed, 5, ""),  # the dispatcher's (stalled, exhausted): no runner's
                ended(FlowDone, 6, "runner_unknown"),  # never registered: no row to count in
                registered("runner_b", 7),
                ended(FlowDone, 8, "runner_b"),
            ),
        )
        runners = {r.runner_id: r for r in await list_runners(db)}
        assert set(runners) == {"runner_a", "runner_b"}
        a = runners["runner_a"]
        assert (a.flows_completed, a.flows_failed, a.labels, a.browser_version) == (
            2,
            1,
            {"region": "eu"},
            "156.0",
        )
        assert (runners["runner_b"].flows_completed, runners["runner_b"].flows_failed) == (1, 0)
        # it starts again: its counts are those of the new start
        await apply_batch(
            db,
            [
                Envelope(seq=9, subject="tb.x", event=registered("runner_a", 9)),
                Envelope(seq=10, subject="tb.x", event=ended(FlowFailed, 10, "runner_a")),
            ],
        )
        a = {r.runner_id: r for r in await list_runners(db)}["runner_a"]
        assert (a.flows_completed, a.flows_failed, a.labels) == (0, 1, {})
    finally:
        await db.close()


async def test_a_runner_beats_three_times_within_the_ttl_the_bucket_really_has(
    bus: Bus, nats_server: NatsServer
) -> None:
    # the bucket was made with a 3 s TTL; this runner was told 15 s
    async with await Bus.connect(
        nats_server.url, name="runner", config=BusConfig(presence_ttl=15)
    ) as runner_bus:
        presence = Presence(runner_bus, "runner_t", LINUX_CHROMIUM, 1, lambda: Load(0, 0, 0, False))
        assert presence.interval == 5.0
        await presence.register()
        assert presence.interval == pytest.approx(1.0)
        kv = await bus.kv(subjects.RUNNERS_BUCKET)
        entry = msgspec.json.decode((await kv.get("runner_t")).value or b"", type=RunnerPresence)
        assert (entry.runner_id, entry.started_at != "") == ("runner_t", True)


# -- one runner's status from presence and read model ---------------------------------------


def test_a_runners_status_joins_its_presence_and_its_read_model_row() -> None:
    from api.runners import status_of
    from projections.queries import RunnerView

    now = T0 + timedelta(minutes=10)
    row = RunnerView(
        runner_id="runner_a",
        os="linux",
        browser="chromium",
        browser_version="155.0",
        slots=2,
        labels={"region": "eu"},
        hostname="h",
        version="0.1.0",
        status="registered",
        flows_completed=7,
        flows_failed=2,
        registered_at=T0,
        last_event_at=T0,
    )
    beat = RunnerPresence(
        runner_id="runner_a",
        os="linux",
        browser="chromium",
        slots=2,
        running=1,
        status="draining",
        browser_version="156.0",
        labels={"region": "eu"},
        started_at=(T0 + timedelta(minutes=4)).isoformat(),  # it started again since
        last_heartbeat=(now - timedelta(seconds=1)).isoformat(),
    )
    both = status_of(beat, row, now)
    assert (both.status, both.online, both.in_flight, both.browser_version) == (
        "draining",
        False,
        1,
        "156.0",
    )
    assert (both.flows_completed, both.flows_failed, both.uptime_seconds) == (7, 2, 360.0)
    assert both.last_heartbeat == now - timedelta(seconds=1)
    # not projected yet: its presence alone, counts from zero
    fresh = status_of(msgspec.structs.replace(beat, status="online", started_at=""), None, now)
    assert (fresh.status, fresh.online, fresh.flows_completed, fresh.started_at) == (
        "online",
        True,
        0,
        None,
    )
    # its presence lapsed: offline unless it deregistered, no uptime, counts kept
    gone = status_of(None, row, now)
    assert (gone.status, gone.online, gone.uptime_seconds, gone.flows_completed) == (
        "offline",
        False,
        None,
        7,
    )
    left = status_of(
        None, msgspec.structs.replace(row, status="deregistered", reason="stopped"), now
    )
    assert (left.status, left.reason) == ("deregistered", "stopped")


async def test_the_version_advertised_is_the_one_the_launched_browser_reports() -> None:
    from agents.platforms import launched_browser_version

    version = await launched_browser_version("chromium")
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", version), version
    managed = await playwright_executables()
    if not os.access(managed.get("firefox", ""), os.X_OK):  # as on this machine
        with pytest.raises(CannotServe, match=r"--browser firefox: .*(doesn.t exist|not found)"):
            await launched_browser_version("firefox")
