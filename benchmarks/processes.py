"""What a process tree costs, read from /proc: PSS of its browser processes, RSS, fds.

PSS (proportional set size) counts a page shared by N processes as 1/N in each, so the
sum over all of a browser's processes counts shared pages once: the fair measure of
what several Chromium processes cost together.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
BROWSER_NAMES = ("chrom", "headless_shell")


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # the name (field 2) may hold spaces and parentheses: split after its last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_browser(pid: int) -> bool:
    try:
        name = (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return False
    return name.startswith(BROWSER_NAMES)


def _rollup_kib(pid: int, field: str) -> int:
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def pss_bytes(pids: Iterable[int]) -> int:
    return sum(_rollup_kib(pid, "Pss:") for pid in pids) * 1024


def rss_bytes(pids: Iterable[int]) -> int:
    return sum(_rollup_kib(pid, "Rss:") for pid in pids) * 1024


def browser_pss(root: int | None = None) -> int:
    """PSS of every browser process below ``root`` (default: this process)."""
    return pss_bytes(p for p in descendants(root or os.getpid()) if is_browser(p))


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:
        return 0
