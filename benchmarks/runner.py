"""Browser density: how many concurrent 1-second flows fit in a memory budget, in one run.

Ours: the runner's executor, one Chromium with a fresh browser context per flow.
Baseline: the naive design, a Chromium launched per flow (one Playwright driver shared,
so only the browser is per flow), the flow opening the same page for the same time.

Each side is ramped through rising concurrency levels; at each level flows run back to
back for a fixed window while the PSS of all browser processes is sampled (PSS counts
a page shared by several processes once). A level is sustained when no flow failed,
the peak PSS stayed within the budget and the machine kept up (median flow time within
``--slack`` times the session plus the side's launch overhead measured at concurrency
1). The highest sustained level of each side is compared: concurrent flows per GiB of
PSS and flows per minute at that level.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from playwright.async_api import Playwright, async_playwright

from agents.browser import launch_chromium
from agents.executor import AllowedHosts, FlowReport
from agents.human import PageTrail
from agents.playwright_flow import JOB_HEADER, PlaywrightExecutor
from benchmarks.processes import browser_pss
from cli.logs import configure_logging
from schemas.events import FlowDispatched, LinkPick, PageTimings
from schemas.ids import new_id, utcnow
from tests.sites import recording_site

GIB = 1024**3
LEVELS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PAGE = (
    """<!doctype html><html><head><title>bench</title></head><body>
<h1>Density</h1>"""
    + "".join(f"<p>Paragraph {n} of text.</p>" for n in range(200))
    + ("</body></html>")
)


class QuietReport:
    """A flow report that keeps nothing (no NATS in this benchmark); a complete
    ``FlowReport``, so mypy checks it against the port."""

    async def page_visited(
        self, url: str, status: int | None, timings: PageTimings | None = None
    ) -> None:
        return None

    async def page_left(self, url: str, trail: PageTrail, timings: PageTimings | None) -> None:
        return None

    async def click_done(self, href: str, link: LinkPick | None = None) -> None:
        return None

    async def click_skipped(self, href: str, reason: str) -> None:
        return None

    async def egress_refused(self, host: str, port: int, reason: str, request: str) -> None:
        return None

    async def keepalive(self) -> None:
        return None


QUIET: FlowReport = QuietReport()  # the assignment makes mypy hold it to the protocol


@dataclass
class Level:
    concurrency: int
    flows: int
    failed: int
    seconds: float
    median_flow: float
    peak_pss: int

    @property
    def per_minute(self) -> float:
        return self.flows * 60 / self.seconds

    @property
    def per_gib(self) -> float:
        return self.concurrency / (self.peak_pss / GIB) if self.peak_pss else 0.0


Flow = Callable[[int], Awaitable[None]]


async def run_level(flow: Flow, concurrency: int, window: float) -> Level:
    """Flows back to back on ``concurrency`` workers for ``window`` seconds."""
    durations: list[float] = []
    failed = 0
    peak = 0
    stop = time.monotonic() + window
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal failed
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                await asyncio.wait_for(flow(next(counter)), timeout=60)
            except Exception:
                failed += 1
            else:
                durations.append(time.monotonic() - began)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await asyncio.to_thread(browser_pss))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    began = time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        sampler.cancel()
    return Level(
        concurrency=concurrency,
        flows=len(durations),
        failed=failed,
        seconds=time.monotonic() - began,
        median_flow=statistics.median(durations) if durations else float("inf"),
        peak_pss=peak,
    )


async def ramp(name: str, flow: Flow, args: argparse.Namespace) -> Level | None:
    """The highest level ``flow`` sustains; prints every level tried."""
    best: Level | None = None
    allowed: float | None = None
    for concurrency in (c for c in LEVELS if c <= args.max_concurrency):
        level = await run_level(flow, concurrency, args.window)
        if allowed is None:  # concurrency 1: the side's own cost of one flow
            allowed = args.slack * level.median_flow
        ok = (
            level.failed == 0
            and level.peak_pss <= args.budget_gib * GIB
            and level.median_flow <= allowed
        )
        print(
            f"  {name:8} x{concurrency:<4} {level.flows:5} flows {level.failed:3} failed  "
            f"median {level.median_flow:5.2f}s  peak PSS {level.peak_pss / GIB:5.2f} GiB  "
            f"{level.per_minute:7.0f} flows/min  {'ok' if ok else 'not sustained'}",
            flush=True,
        )
        if not ok:
            break
        best = level
    return best


def work_item(url: str, host: str, session: float, n: int) -> FlowDispatched:
    return FlowDispatched(
        id=new_id(),
        at=utcnow(),
        actor="bench",
        job_id="bench_runner",
        flow_id=f"bench_runner_0_{n}",
        attempt=1,
        target_index=0,
        url=url,
        clicks=0,
        session_seconds=session,
        allowed_hosts=[host],
        seed=n,
    )


async def ours(url: str, host: str, args: argparse.Namespace) -> Level | None:
    executor = PlaywrightExecutor(version="bench")
    await executor.start()

    async def flow(n: int) -> None:
        item = work_item(url, host, args.session, n)
        await executor.run(item, QUIET, AllowedHosts(item.allowed_hosts))

    try:
        return await ramp("ours", flow, args)
    finally:
        await executor.close()


async def baseline(url: str, args: argparse.Namespace) -> Level | None:
    async with async_playwright() as playwright:
        return await ramp("baseline", browser_per_flow(playwright, url, args.session), args)


def browser_per_flow(playwright: Playwright, url: str, session: float) -> Flow:
    async def flow(n: int) -> None:
        browser = await launch_chromium(playwright)
        try:
            context = await browser.new_context(extra_http_headers={JOB_HEADER: "bench"})
            page = await context.new_page()
            await page.goto(url, wait_until="domcontentloaded")
            await asyncio.sleep(session)
        finally:
            await browser.close()

    return flow


def verdict(label: str, ours_value: float, base_value: float, goal: float) -> str:
    ratio = ours_value / base_value if base_value else float("inf")
    return (
        f"{label}: ours {ours_value:,.1f}, baseline {base_value:,.1f}, "
        f"ratio {ratio:.2f} (goal >= {goal:g})"
    )


async def main(args: argparse.Namespace) -> None:
    configure_logging("warning")
    with recording_site(pages={"/": PAGE}) as site:
        url = f"{site.base_url}/"
        print(
            f"1-second flows against {url}; budget {args.budget_gib:g} GiB PSS of browser "
            f"processes; {args.window:g} s per level",
            flush=True,
        )
        base = await baseline(url, args)
        mine = await ours(url, site.host, args)
    if base is None or mine is None:
        print("a side sustained no level at all; no ratio")
        return
    print(
        f"ours:     {mine.concurrency} concurrent flows, {mine.per_gib:,.1f} per GiB, "
        f"{mine.per_minute:,.0f} flows/min (peak PSS {mine.peak_pss / GIB:.2f} GiB)"
    )
    print(
        f"baseline: {base.concurrency} concurrent flows, {base.per_gib:,.1f} per GiB, "
        f"{base.per_minute:,.0f} flows/min (peak PSS {base.peak_pss / GIB:.2f} GiB)"
    )
    print(verdict("concurrent flows per GiB", mine.per_gib, base.per_gib, 3))
    print(verdict("flows/minute at the budget", mine.per_minute, base.per_minute, 2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--session", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=12.0, help="seconds per level")
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument(
        "--slack", type=float, default=2.0, help="median flow time allowed, x concurrency 1's"
    )
    asyncio.run(main(parser.parse_args()))
