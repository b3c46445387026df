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

The egress phase measures what the runner's egress proxy costs: the same flows (the
same seeds, so the same dwell drawn in [0, ``--dwell-max``] s and the same clicks) at
the same concurrency through the executor as it runs, and through one whose browser
contexts connect directly, alternating the order over several rounds in the same run.

``--only density`` or ``--only egress`` runs one phase alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from playwright.async_api import Playwright, ProxySettings, async_playwright

from agents.browser import launch_chromium
from agents.egress.proxy import FlowEgress
from agents.executor import AllowedHosts, FlowReport
from agents.human import PageTrail
from agents.playwright_flow import JOB_HEADER, PlaywrightExecutor
from benchmarks.processes import browser_pss
from cli.logs import configure_logging
from schemas.events import FlowDispatched, LinkPick, PageTimings
from schemas.ids import new_id, utcnow
from schemas.values import JobSettings, SessionDuration
from tests.sites import recording_site

GIB = 1024**3
FLOW_TIMEOUT = 60  # seconds: a flow slower than this counts as failed
MIB = 1024**2
LEVELS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PAGE = (
    """<!doctype html><html><head><title>bench</title></head><body>
<h1>Density</h1>"""
    + "".join(f"<p>Paragraph {n} of text.</p>" for n in range(200))
    + ("</body></html>")
)
LINKED = PAGE.replace("<h1>Density</h1>", '<h1>Egress</h1><a href="/a">a</a> <a href="/b">b</a>')
LINKED_PAGES = {"/": LINKED, "/a": LINKED, "/b": LINKED}


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

    async def proxy_failed(self, proxy_id: str, proxy: str, error: str, reason: str) -> None:
        return None

    async def keepalive(self) -> None:
        return None


QUIET: FlowReport = QuietReport()  # the assignment makes mypy hold it to the protocol


@dataclass
class Batch:
    flows: int
    failed: int
    seconds: float
    why: Counter[str] = field(default_factory=Counter)  # failures by reason

    @property
    def per_minute(self) -> float:
        return self.flows * 60 / self.seconds


@dataclass(kw_only=True)
class Level(Batch):
    concurrency: int
    median_flow: float
    peak_pss: int

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
                await asyncio.wait_for(flow(next(counter)), timeout=FLOW_TIMEOUT)
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


def work_item(
    url: str,
    host: str,
    session: float,
    n: int,
    clicks: int = 0,
    settings: JobSettings | None = None,
) -> FlowDispatched:
    return FlowDispatched(
        id=new_id(),
        at=utcnow(),
        actor="bench",
        job_id="bench_runner",
        flow_id=f"bench_runner_0_{n}",
        attempt=1,
        target_index=0,
        url=url,
        clicks=clicks,
        session_seconds=session,
        allowed_hosts=[host],
        seed=n,
        settings=settings,
    )


async def ours(url: str, host: str, args: argparse.Namespace) -> Level | None:
    executor = PlaywrightExecutor(version="bench")
    await executor.start()
    await asyncio.sleep(2)  # the browser's start-up settled
    idle = await asyncio.to_thread(browser_pss)

    async def flow(n: int) -> None:
        item = work_item(url, host, args.session, n)
        await executor.run(item, QUIET, AllowedHosts(item.allowed_hosts))

    try:
        best = await ramp("ours", flow, args)
    finally:
        await executor.close()
    if best is not None:
        # what agents.capacity.PER_FLOW_BYTES rests on
        per_context = (best.peak_pss - idle) / best.concurrency
        print(
            f"ours: idle browser {idle / MIB:,.0f} MiB PSS; {per_context / MIB:,.0f} MiB PSS "
            f"per context above it at x{best.concurrency}",
            flush=True,
        )
    return best


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


# -- what the egress proxy costs ----------------------------------------------------


class CountingExecutor(PlaywrightExecutor):
    """The executor as the runner runs it, keeping each flow's egress registration so
    the run can show its connections went through the proxy."""

    def __init__(self, version: str) -> None:
        super().__init__(version)
        self.registrations: list[FlowEgress] = []

    def context_proxy(self, egress: FlowEgress) -> ProxySettings | None:
        self.registrations.append(egress)
        return super().context_proxy(egress)

    @property
    def proxied_connections(self) -> int:
        return sum(egress.opened for egress in self.registrations)


class DirectExecutor(CountingExecutor):
    """The same executor with its browser contexts connecting directly (no egress proxy)."""

    def context_proxy(self, egress: FlowEgress) -> ProxySettings | None:
        self.registrations.append(egress)
        return None


async def run_batch(flow: Flow, concurrency: int, flows: int) -> Batch:
    """Flows 0..``flows``-1 on ``concurrency`` workers, to the last one."""
    why: Counter[str] = Counter()
    counter = iter(range(flows))

    async def worker() -> None:
        for n in counter:
            try:
                await asyncio.wait_for(flow(n), timeout=FLOW_TIMEOUT)
            except TimeoutError:
                why[f"over {FLOW_TIMEOUT} s"] += 1
            except Exception as err:
                why[getattr(err, "reason", None) or repr(err)[:120]] += 1

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    failed = why.total()
    return Batch(flows - failed, failed, time.monotonic() - began, why)


def dwell_settings(dwell_max: float) -> JobSettings:
    """Each flow's session drawn uniformly in [0, dwell_max] s from its seed."""
    return JobSettings(
        session_duration=SessionDuration(mode="variable", min_seconds=0, max_seconds=dwell_max)
    )


async def egress_cost(url: str, host: str, args: argparse.Namespace) -> None:
    settings = dwell_settings(args.dwell_max)
    sides = {"proxied": CountingExecutor("bench"), "direct": DirectExecutor("bench")}
    for executor in sides.values():
        await executor.start()

    def flow_on(executor: PlaywrightExecutor) -> Flow:
        async def flow(n: int) -> None:
            item = work_item(url, host, 0.0, n, args.egress_clicks, settings)
            await executor.run(item, QUIET, AllowedHosts(item.allowed_hosts))

        return flow

    print(
        f"egress proxy cost: {args.egress_flows} flows per side and round, "
        f"{args.egress_concurrency} at a time, dwell in [0, {args.dwell_max:g}] s, "
        f"{args.egress_clicks} click(s); {args.egress_rounds} rounds, order alternating",
        flush=True,
    )
    rates: dict[str, list[float]] = {name: [] for name in sides}
    failed = 0
    try:
        for round_ in range(args.egress_rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                batch = await run_batch(
                    flow_on(sides[name]), args.egress_concurrency, args.egress_flows
                )
                failed += batch.failed
                rates[name].append(batch.per_minute)
                print(
                    f"  round {round_ + 1} {name:8} {batch.flows:5} flows {batch.failed:3} "
                    f"failed in {batch.seconds:6.1f} s  {batch.per_minute:7.1f} flows/min"
                    + "".join(f"\n    failed: {n} x {reason}" for reason, n in batch.why.items()),
                    flush=True,
                )
        connections = {name: executor.proxied_connections for name, executor in sides.items()}
    finally:
        for executor in sides.values():
            await executor.close()
    proxied, direct = (statistics.median(rates[name]) for name in ("proxied", "direct"))
    cost = 1 - proxied / direct if direct else float("nan")
    print(
        f"connections through the egress proxy: proxied {connections['proxied']:,}, "
        f"direct {connections['direct']:,}"
    )
    print(
        f"flows/minute (median of {args.egress_rounds}): with the egress proxy {proxied:,.1f}, "
        f"without {direct:,.1f}; ratio {proxied / direct:.3f}, cost {cost:.1%} (goal under 10%)"
        + (f"; {failed} flows failed, the figures are not comparable" if failed else "")
    )


def verdict(label: str, ours_value: float, base_value: float, goal: float) -> str:
    ratio = ours_value / base_value if base_value else float("inf")
    return (
        f"{label}: ours {ours_value:,.1f}, baseline {base_value:,.1f}, "
        f"ratio {ratio:.2f} (goal >= {goal:g})"
    )


async def density(args: argparse.Namespace) -> None:
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


async def main(args: argparse.Namespace) -> None:
    configure_logging("warning")
    if args.only in (None, "density"):
        await density(args)
    if args.only in (None, "egress"):
        with recording_site(pages=LINKED_PAGES) as site:
            await egress_cost(f"{site.base_url}/", site.host, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--session", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=12.0, help="seconds per level")
    parser.add_argument("--max-concurrency", type=int, default=256)
    parser.add_argument(
        "--slack", type=float, default=2.0, help="median flow time allowed, x concurrency 1's"
    )
    parser.add_argument("--only", choices=["density", "egress"], default=None)
    egress = parser.add_argument_group("egress phase")
    egress.add_argument("--egress-flows", type=int, default=120, help="per side and round")
    egress.add_argument("--egress-concurrency", type=int, default=8)
    egress.add_argument("--egress-rounds", type=int, default=3)
    egress.add_argument("--egress-clicks", type=int, default=1, help="clicks per flow")
    egress.add_argument("--dwell-max", type=float, default=1.0, help="seconds")
    parsed = parser.parse_args()
    if min(parsed.egress_flows, parsed.egress_concurrency, parsed.egress_rounds) < 1:
        parser.error("--egress-flows, --egress-concurrency and --egress-rounds: at least 1")
    asyncio.run(main(parsed))
