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
import time

from benchmarks.processes import descendants, open_fds, rss_bytes
from benchmarks.system import LocalSystem, local_system
from engine.jobs.service import JobCommands
from schemas import subjects
from schemas.events import JobCompleted, JobFailed
from schemas.values import JobSettings, Platform, Target

MIB = 1024**2
PAGE = """<!doctype html><html><body><h1>Soak</h1>
<a href="/a">a</a> <a href="/b">b</a></body></html>"""
PAGES = {"/": PAGE, "/a": PAGE, "/b": PAGE}


class Footprint:
    def __init__(self, root: int) -> None:
        tree = [root, *descendants(root)]
        self.processes = len(tree)
        self.rss = rss_bytes(tree)
        self.fds = sum(open_fds(pid) for pid in tree)

    def __str__(self) -> str:
        return f"RSS {self.rss / MIB:,.0f} MiB, {self.fds} open fds, {self.processes} processes"


async def run_job(system: LocalSystem, flows: int, args: argparse.Namespace) -> None:
    """One job of ``flows`` short flows, to its end."""
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
                    return
    raise RuntimeError("event stream ended")


async def soak(system: LocalSystem, args: argparse.Namespace) -> tuple[Footprint, Footprint]:
    """Both looks are taken between jobs, with no flow open: the same state twice."""
    await run_job(system, args.settle, args)
    await asyncio.sleep(2)  # contexts closed, renderers gone
    first = Footprint(system.runner.pid)
    print(f"after {args.settle:,} flows: {first}", flush=True)
    await run_job(system, args.flows - args.settle, args)
    await asyncio.sleep(2)
    last = Footprint(system.runner.pid)
    return first, last


async def main(args: argparse.Namespace) -> None:
    runner = ["--slots", str(args.slots)]
    async with local_system(runner, pages=PAGES) as system:
        print(
            f"soak: {args.flows:,} flows of {args.session:g} s with one click on one runner "
            f"({args.slots} slots)",
            flush=True,
        )
        first, last = await soak(system, args)
    print(f"at the end: {last}")
    growth = last.rss / first.rss - 1
    print(
        f"RSS growth {growth:+.1%} (goal within 15%); open fds {first.fds} -> {last.fds} "
        f"(goal: flat)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--settle", type=int, default=200, help="flows before the first look")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--session", type=float, default=0.0, help="seconds per flow")
    parser.add_argument("--timeout", type=float, default=3600)
    asyncio.run(main(parser.parse_args()))
