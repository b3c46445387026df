"""A runner's capacity (flows at once) when it is not set: derived from the machine.

One Chromium serves all of a runner's flows, a fresh browser context each, so what a
flow adds is one context with its renderer processes; the rule below is the memory
left after the runner itself, divided by what a flow costs, and bounded by the cores
(navigation, layout and the mouse and scroll steps of a flow use CPU in bursts).

Memory is ``MemAvailable`` from /proc/meminfo, not ``MemTotal``: the runner takes
what is free beside whatever else already runs on the machine (page cache counts as
available, since the kernel gives it back), so it neither pushes the host into swap
nor counts memory another service holds. In a container with a memory limit (cgroup
v2 ``memory.max``) the limit, less what the cgroup already uses, bounds it too, since
/proc/meminfo shows the host's memory there. Without /proc (macOS) the physical
memory counts; where no figure can be read (Windows) the capacity is 2, as before it
was derived. Cores are those the process may run on (``os.sched_getaffinity``, else
``os.cpu_count``), bounded by a cgroup CPU quota.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1024**2

# What one flow adds: the executor's flows on `just bench-runner`'s test page measured
# a PSS (all browser processes, shared pages once) of 34-41 MiB per concurrent context
# at 4-8 contexts (16: 32 MiB each), one renderer process per context (Chromium starts
# without the omnibox popup that took a second one, ``agents.browser.UNUSED_FEATURES``).
# A real site's page (scripts, images, a larger DOM) weighs more than that static page,
# so a flow is reckoned at twice the measure.
PER_FLOW_BYTES = 80 * MIB
# The runner itself before any flow: its Python process, the Playwright driver and the
# idle browser measured ~260-300 MiB PSS together; the rest is headroom.
BASE_BYTES = 512 * MIB
# Flows in progress per core: a flow is mostly waiting (dwell, network), with bursts of
# work at each navigation and step. A judgment still to be checked on a quiet machine:
# the highest concurrency bench-runner's density phase sustains, per core.
FLOWS_PER_CORE = 4
# where the memory cannot be read, the capacity runners had before it was derived
UNKNOWN_MEMORY_CAPACITY = 2

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def derived_capacity(
    memory_bytes: int,
    cores: int,
    *,
    per_flow_bytes: int = PER_FLOW_BYTES,
    base_bytes: int = BASE_BYTES,
    flows_per_core: int = FLOWS_PER_CORE,
) -> int:
    """Flows a runner runs at once on a machine with ``memory_bytes`` free for it and
    ``cores`` cores: what memory allows after the runner's own, bounded by the cores;
    never below 1 (a runner that can run nothing would be no runner)."""
    by_memory = (memory_bytes - base_bytes) // per_flow_bytes
    by_cores = cores * flows_per_core
    return max(1, min(by_memory, by_cores))


@dataclass(frozen=True)
class Machine:
    """What the rule was given and where each figure came from, for the runner's log."""

    memory_bytes: int | None  # None: not known on this system
    memory_source: str
    cores: int
    cores_source: str

    @property
    def capacity(self) -> int:
        if self.memory_bytes is None:
            return UNKNOWN_MEMORY_CAPACITY
        return derived_capacity(self.memory_bytes, self.cores)


def meminfo_bytes(text: str, field: str) -> int | None:
    """A ``kB`` field of /proc/meminfo, in bytes (None when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    return None


def cgroup_number(path: Path) -> int | None:
    """A cgroup v2 file holding one number (``max`` or no file: None)."""
    try:
        raw = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(raw) if raw.isdigit() else None


def free_memory(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> tuple[int | None, str]:
    """Memory a runner may take now, and where the figure came from (None: unknown)."""
    try:
        text = meminfo.read_text()
    except OSError:  # no /proc (macOS): the physical memory, what is free unknown
        return physical_memory()
    found = meminfo_bytes(text, "MemAvailable")
    source = "MemAvailable"
    if found is None:  # kernels before 3.14
        found, source = meminfo_bytes(text, "MemTotal"), "MemTotal"
    limit = cgroup_number(cgroup / "memory.max")
    if limit is not None:
        in_cgroup = max(limit - (cgroup_number(cgroup / "memory.current") or 0), 0)
        if found is None or in_cgroup < found:
            found, source = in_cgroup, "cgroup memory.max less memory.current"
    return found, source


def physical_memory() -> tuple[int | None, str]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "SC_PHYS_PAGES"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None, "unknown"


def usable_cores(cgroup: Path = CGROUP) -> tuple[int, str]:
    """Cores a runner may use, and where the figure came from."""
    try:
        cores, source = len(os.sched_getaffinity(0)), "sched_getaffinity"
    except AttributeError:  # not on Linux
        cores, source = os.cpu_count() or 1, "cpu_count"
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cores, source
    if quota.isdigit() and period.isdigit() and int(period) > 0:
        limited = max(1, math.ceil(int(quota) / int(period)))
        if limited < cores:
            return limited, "cgroup cpu.max"
    return cores, source


def this_machine() -> Machine:
    memory, memory_source = free_memory()
    cores, cores_source = usable_cores()
    return Machine(memory, memory_source, cores, cores_source)
