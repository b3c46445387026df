"""Soak: thousands of short flows on one runner, its memory and open files watched.

A real system (nats-server, engine, one runner process with its Chromium) runs short
flows against a loopback site: a job of the first ``--settle`` flows, then one of the
rest. The runner's RSS plus that of every process below it (the Playwright driver and
the browser's processes) and their open file descriptors are read after each job, with
no flow open: a leaked context, page, listener or connection shows as growth.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from collections import Counter

from benchmarks.processes import PROC, descendants, open_fds, rss_bytes
from benchmarks.system import LocalSystem, local_system
from engine.jobs.service import JobCommands
from schemas import subjects
from schemas.events import JobCompleted, JobFailed
from schemas.values import JobSettings, Platform, Target

MIB = 1024**2
PAGE = """<!doctype html><html><body><h1>Soak</h1>
<a href="/a">a</a> <a href="/b">b</a></body></html>"""
PAGES = {"/": PAGE, "/a": PAGE, "/b": PAGE}
PROCESS_TYPE = re.compile(r"--type=([\w-]+)")
RENDERER = "chromium:renderer"
UTILITY_TYPE = re.compile(r"--utility-sub-type=[\w.]*\.(\w+)")
FD_SLACK = 0.05
RSS_GOAL = 0.15
# What the estimate at the start rests on. Quick end: a flow of this soak (land, one
# click, a 0-second session) took ~2.5 s of executor time alone, with at most ~2 flows
# in progress per core keeping pace. Slow end: runs of 60 flows (4 slots) on a 2-core
# machine busy with other work (load ~20) went at 9-14 flows/min. The estimate printed
# after the first look uses the run's own pace.
SECONDS_PER_FLOW = 2.5
CORE_BOUND_SLOTS = 2
BUSY_PER_MINUTE = 12


def kind(pid: int) -> str:
    """What a process is: its name, and a Chromium process's type (renderer, gpu...).
    Chromium rewrites its command line as one string, so the type is searched for."""
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        name = (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "gone"
    found = PROCESS_TYPE.search(cmdline)
    if found is None:
        return name
    service = UTILITY_TYPE.search(cmdline)  # e.g. network.mojom.NetworkService
    return f"{name}:{found[1]}" + (f":{service[1]}" if service else "")


class Footprint:
    def __init__(self, root: int) -> None:
        tree = [root, *descendants(root)]
        self.processes = len(tree)
        self.kinds: Counter[str] = Counter()  # processes of each kind
        self.kind_fds: Counter[str] = Counter()  # and their open fds
        self.kind_rss: Counter[str] = Counter()  # and their RSS
        for pid in tree:
            name = kind(pid)
            self.kinds[name] += 1
            self.kind_fds[name] += open_fds(pid)
            self.kind_rss[name] += rss_bytes([pid])
        self.rss = self.kind_rss.total()
        self.fds = self.kind_fds.total()

    def __str__(self) -> str:
        return f"RSS {self.rss / MIB:,.0f} MiB, {self.fds} open fds, {self.processes} processes"

    def by_kind(self) -> str:
        return ", ".join(
            f"{name} x{count} ({self.kind_rss[name] / MIB:,.0f} MiB, {self.kind_fds[name]} fds)"
            for name, count in sorted(self.kinds.items())
        )


async def run_job(system: LocalSystem, flows: int, args: argparse.Namespace) -> float:
    """One job of ``flows`` short flows, to its end; the seconds it took."""
    job_id, created = await JobCommands(system.bus).create(
        name="soak",
        targets=[Target(url=f"{system.site.base_url}/", flows=flows, clicks=1)],
        settings=JobSettings(instance_count=args.slots, session_seconds=args.session),
        platform=Platform(),
        actor="bench",
    )
    started = time.monotonic()
    async with asyncio.timeout(args.timeout):
        async for batch in system.bus.read(created.seq, subjects.job_stream_filter(job_id)):
            for env in batch:
                if isinstance(env.event, JobFailed):
                    raise RuntimeError(f"soak job failed: {env.event.reason}")
                if isinstance(env.event, JobCompleted):
                    took = time.monotonic() - started
                    print(
                        f"  {flows:,} flows: {env.event.flows_done} done, "
                        f"{env.event.flows_failed} failed in {took:,.0f} s "
                        f"({flows * 60 / took:,.0f}/min)",
                        flush=True,
                    )
                    return took
    raise RuntimeError("event stream ended")


async def soak(system: LocalSystem, args: argparse.Namespace) -> tuple[Footprint, Footprint]:
    """Both looks are taken between jobs, with no flow open: the same state twice."""
    took = await run_job(system, args.settle, args)
    await asyncio.sleep(2)  # contexts closed, renderers gone
    first = Footprint(system.runner.pid)
    print(f"after {args.settle:,} flows: {first}\n  {first.by_kind()}", flush=True)
    rest = args.flows - args.settle
    print(f"the other {rest:,} flows at this pace: about {rest * took / args.settle / 60:,.0f} min")
    await run_job(system, args.flows - args.settle, args)
    await asyncio.sleep(2)
    last = Footprint(system.runner.pid)
    return first, last


def estimated_minutes(flows: int, slots: int, session: float) -> tuple[float, float]:
    """How long ``flows`` take: on a quiet machine, and on a busy 2-core one."""
    per_slot = 60 / (SECONDS_PER_FLOW + session)  # flows/min each slot keeps up
    quiet = flows / (per_slot * min(slots, CORE_BOUND_SLOTS * (os.cpu_count() or 1)))
    busy = flows * (SECONDS_PER_FLOW + session) / SECONDS_PER_FLOW / BUSY_PER_MINUTE
    return quiet, max(quiet, busy)


def fds_verdict(first: Footprint, last: Footprint) -> str:
    """Flat: each kind of process there as often at the end as at the first look (the
    runner, the Playwright driver, the browser's main, gpu, zygote, network and storage
    processes) holds no more fds, within ``FD_SLACK``, and renderers did not pile up (a
    leaked page or context keeps its renderer; Chromium may keep one spare). Kinds that
    came or went (a utility Chromium starts on demand) are listed."""
    steady = [n for n in first.kinds if n != RENDERER and last.kinds[n] == first.kinds[n]]
    grew = {name: last.kind_fds[name] - first.kind_fds[name] for name in steady}
    flat = last.kinds[RENDERER] <= first.kinds[RENDERER] + 1 and all(
        d <= max(FD_SLACK * first.kind_fds[name], 3) for name, d in grew.items()
    )
    changes = ", ".join(f"{name} {d:+d}" for name, d in sorted(grew.items()) if d) or "none"
    came_or_went = ", ".join(
        f"{name} x{first.kinds[name]} -> x{last.kinds[name]}"
        for name in sorted(set(first.kinds) | set(last.kinds))
        if first.kinds[name] != last.kinds[name]
    )
    return (
        f"open fds {first.fds} -> {last.fds}; of processes there at both looks: {changes}; "
        f"{'flat' if flat else 'NOT flat'} (goal: flat); came or went: {came_or_went or 'none'}"
    )


async def main(args: argparse.Namespace) -> None:
    runner = ["--slots", str(args.slots)]
    quick, slow = estimated_minutes(args.flows, args.slots, args.session)
    if args.timeout is None:
        args.timeout = max(3600.0, 2 * slow * 60)
    async with local_system(runner, pages=PAGES) as system:
        print(
            f"soak: {args.flows:,} flows of {args.session:g} s with one click on one runner "
            f"({args.slots} slots); estimated {quick:,.0f} min on a quiet machine, up to "
            f"{slow:,.0f} min on a busy 2-core one",
            flush=True,
        )
        first, last = await soak(system, args)
    print(f"at the end: {last}\n  {last.by_kind()}")
    growth = last.rss / first.rss - 1
    verdict = "within" if growth <= RSS_GOAL else "NOT within"
    came_or_went = sum(
        last.kind_rss[name] - first.kind_rss[name]
        for name in set(first.kinds) | set(last.kinds)
        if first.kinds[name] != last.kinds[name]
    )
    print(
        f"RSS growth {growth:+.1%}, {verdict} the goal of {RSS_GOAL:.0%} "
        f"({came_or_went / MIB:+,.0f} MiB of it in processes that came or went)"
    )
    print(fds_verdict(first, last))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--settle", type=int, default=200, help="flows before the first look")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--session", type=float, default=0.0, help="seconds per flow")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per job (default: 2x the slow estimate)",
    )
    parsed = parser.parse_args()
    if not 0 < parsed.settle < parsed.flows:
        parser.error("--settle must be at least 1 and fewer than --flows")
    asyncio.run(main(parsed))
