"""A runner's capacity when not set: derived from the machine's free memory and cores,
logged with where it came from, and advertised as derived."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.capacity import (
    BASE_BYTES,
    FLOWS_PER_CORE,
    MIB,
    PER_FLOW_BYTES,
    UNKNOWN_MEMORY_CAPACITY,
    Machine,
    derived_capacity,
    free_memory,
    meminfo_bytes,
    usable_cores,
)
from cli.runner_options import NO_BROWSER_SLOTS, SLOTS_ENV, runner_capacity
from engine.bus import Bus
from schemas import subjects
from schemas.presence import RunnerPresence
from tests.conftest import NatsServer

GIB = 1024**3
MEMINFO = """MemTotal:       24683656 kB
MemFree:        20000000 kB
MemAvailable:   22571492 kB
Buffers:          100000 kB
"""

memory = st.integers(min_value=0, max_value=2**44)
cores = st.integers(min_value=1, max_value=1024)


def test_memory_bounds_a_small_machine_and_cores_a_large_one() -> None:
    assert derived_capacity(2 * GIB, 8) == (2 * GIB - BASE_BYTES) // PER_FLOW_BYTES == 19
    assert derived_capacity(64 * GIB, 2) == 2 * FLOWS_PER_CORE
    assert derived_capacity(BASE_BYTES + 3 * PER_FLOW_BYTES, 16) == 3


def test_a_machine_too_small_still_runs_one_flow() -> None:
    assert derived_capacity(0, 1) == 1
    assert derived_capacity(BASE_BYTES // 2, 4) == 1


@given(memory, cores)
def test_capacity_is_never_below_one(memory_bytes: int, n: int) -> None:
    assert derived_capacity(memory_bytes, n) >= 1


@given(memory, memory, cores)
def test_more_memory_never_lowers_capacity(a: int, b: int, n: int) -> None:
    low, high = sorted((a, b))
    assert derived_capacity(low, n) <= derived_capacity(high, n)


@given(memory, cores, cores)
def test_more_cores_never_lower_capacity(memory_bytes: int, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert derived_capacity(memory_bytes, low) <= derived_capacity(memory_bytes, high)


def test_meminfo_fields_are_read_in_bytes() -> None:
    assert meminfo_bytes(MEMINFO, "MemAvailable") == 22571492 * 1024
    assert meminfo_bytes(MEMINFO, "MemTotal") == 24683656 * 1024
    assert meminfo_bytes(MEMINFO, "SwapTotal") is None


def test_free_memory_is_mem_available_else_mem_total(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    assert free_memory(meminfo, tmp_path / "none") == (22571492 * 1024, "MemAvailable")
    meminfo.write_text("MemTotal:  1048576 kB\n")  # a kernel without MemAvailable
    assert free_memory(meminfo, tmp_path / "none") == (GIB, "MemTotal")


def test_without_proc_the_physical_memory_counts(tmp_path: Path) -> None:
    memory_bytes, source = free_memory(tmp_path / "no-meminfo", tmp_path)
    assert source == "SC_PHYS_PAGES"
    assert memory_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_unknown_memory_keeps_the_former_default() -> None:
    assert Machine(None, "unknown", 64, "cpu_count").capacity == UNKNOWN_MEMORY_CAPACITY
    assert Machine(64 * GIB, "MemAvailable", 1, "cpu_count").capacity == FLOWS_PER_CORE


def test_a_cgroup_memory_limit_bounds_free_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    (tmp_path / "memory.max").write_text(f"{2 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{GIB // 2}\n")
    memory_bytes, source = free_memory(meminfo, tmp_path)
    assert (memory_bytes, source) == (GIB + GIB // 2, "cgroup memory.max less memory.current")
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert free_memory(meminfo, tmp_path)[1] == "MemAvailable"


def test_cores_are_the_affinity_bounded_by_a_cgroup_quota(tmp_path: Path) -> None:
    mine = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (mine, "sched_getaffinity")
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one
    assert usable_cores(tmp_path) == (1, "cgroup cpu.max")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == (mine, "sched_getaffinity")


def test_slots_given_win_then_the_environment_then_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SLOTS_ENV, "7")
    assert runner_capacity(3) == 3
    assert runner_capacity(None) == 7
    monkeypatch.setenv(SLOTS_ENV, "0")
    with pytest.raises(SystemExit, match=f"{SLOTS_ENV}: must be a whole number, at least 1"):
        runner_capacity(None)
    monkeypatch.delenv(SLOTS_ENV)
    assert runner_capacity(None, browser=False) == NO_BROWSER_SLOTS
    assert runner_capacity(None) >= 1


@pytest.mark.slow  # launches Chromium twice: ~30 s on a busy 2-core machine
@pytest.mark.timeout(90)
async def test_a_runner_advertises_the_capacity_it_derived_and_says_how(
    bus: Bus, nats_server: NatsServer
) -> None:
    env = {**os.environ, "TB_PRESENCE_TTL": "3", "TB_LOG_LEVEL": "info"}
    env.pop(SLOTS_ENV, None)
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "runner", "--nats-url", nats_server.url,
        "--runner-id", "runner_capacity",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert runner.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            while not any(line.get("event") == "Registered as runner" for line in lines):
                raw = await runner.stderr.readline()
                assert raw, f"the runner ended: {lines}"
                if raw.startswith(b"{"):
                    lines.append(json.loads(raw))
        entry = await (await bus.kv(subjects.RUNNERS_BUCKET)).get("runner_capacity")
    finally:
        runner.send_signal(signal.SIGTERM)
        await asyncio.wait_for(runner.wait(), 30)
    (said,) = [line for line in lines if line.get("event") == "Capacity"]
    assert said["source"] == "derived from this machine"
    assert said["memory_from"] in ("MemAvailable", "cgroup memory.max less memory.current")
    # the figures it logged give the capacity it took: MiB are exact for the rule
    assert said["slots"] == derived_capacity(said["memory_mib"] * MIB, said["cores"])
    assert entry.value is not None
    assert msgspec.json.decode(entry.value, type=RunnerPresence).slots == said["slots"]
