"""Seeded flow behaviour in real Chromium against sites served on loopback: the same
job seed and flow index give the same scrolls, moves and clicks; device profiles,
referrer, traffic delay, pages per session, external clicks and page timings."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import pytest_asyncio

from agents.human import PageTrail
from agents.playwright_flow import PlaywrightExecutor
from schemas.device_catalogue import CatalogueVersion, ShippedCatalogues, content_sha256
from schemas.devices import DeviceProfile, Viewport
from schemas.events import (
    FlowDispatched,
    LinkPick,
    PageTimings,
)
from schemas.values import JobSettings, SecondsRange
from tests.device_catalogues import IPHONE, IPHONE_V2_AGENT, add_version_2, with_version_1
from tests.sites import recording_site
from tests.test_executor import chromium, needs_chromium

__all__ = ["chromium"]  # the fixture the browser tests need

VERSION = "9.9.9-test"
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]


def tall(body: str) -> str:
    """A page long enough to scroll, its links at the top."""
    filler = "".join(f"<p style='height:300px'>section {i}</p>" for i in range(12))
    return f"<!doctype html><html><body>{body}{filler}</body></html>"


SHOP = {
    path: tall(" ".join(f"<a href='{p}'>{p}</a>" for p in ("/", "/a", "/b", "/c", "/d")))
    for path in ("/", "/a", "/b", "/c", "/d")
}


@dataclass
class Recorded:
    visits: list[tuple[str, int | None, PageTimings | None]] = field(default_factory=list)
    left: list[tuple[str, PageTrail, PageTimings | None]] = field(default_factory=list)
    clicks: list[tuple[str, LinkPick | None]] = field(default_factory=list)
    skips: list[tuple[str, str]] = field(default_factory=list)

    async def page_visited(
        self, url: str, status: int | None, timings: PageTimings | None = None
    ) -> None:
        self.visits.append((url, status, timings))

    async def page_left(self, url: str, trail: PageTrail, timings: PageTimings | None) -> None:
        self.left.append((url, trail, timings))

    async def click_done(self, href: str, link: LinkPick | None = None) -> None:
        self.clicks.append((href, link))

    async def click_skipped(self, href: str, reason: str) -> None:
        self.skips.append((href, reason))

    async def keepalive(self) -> None:
        pass


def work_item(
    url: str,
    settings: JobSettings,
    *,
    clicks: int = 0,
    seed: int = 1,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    referrer: str | None = None,
    ports: dict[str, list[int]] | None = None,
) -> FlowDispatched:
    return FlowDispatched(
        id="evt-1",
        at=datetime.now(UTC),
        actor="system",
        job_id="job-behaviour",
        flow_id="job-behaviour_0_0",
        attempt=1,
        target_index=0,
        url=url,
        clicks=clicks,
        session_seconds=settings.session.longest,
        allowed_hosts=list(hosts),
        seed=seed,
        referrer=referrer,
        settings=settings,
        allowed_ports=ports or {},  # none: 80, 443 and the target's port
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def executor() -> AsyncIterator[PlaywrightExecutor]:
    ex = PlaywrightExecutor(VERSION)
    await ex.start()
    yield ex
    await ex.close()


async def browse(
    executor: PlaywrightExecutor, pages: dict[str, str], settings: JobSettings
) -> Recorded:
    """One flow on a site of ``pages`` served on 127.0.0.1."""
    with recording_site(pages=pages) as site:
        report = Recorded()
        await executor.run(work_item(f"{site.base_url}/", settings), report)
    return report


# -- device profiles ------------------------------------------------------------------

REPORTING_PAGE = """<!doctype html><html><head>
<meta name="viewport" content="width=device-width, initial-scale=1"></head><body><script>
const q = new URLSearchParams({
  ua: navigator.userAgent, w: innerWidth, h: innerHeight, dpr: devicePixelRatio,
  touch: navigator.maxTouchPoints, lang: navigator.language,
  tz: Intl.DateTimeFormat().resolvedOptions().timeZone,
});
fetch('/report?' + q);
</script></body></html>"""


def reports(site_requests: list[tuple[str, dict[str, str]]]) -> list[dict[str, str]]:
    return [
        {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        for path, _ in site_requests
        if path.startswith("/report?")
    ]


@pytest.mark.slow
@needs_chromium
async def test_device_profile_with_overrides_is_what_the_page_sees(
    executor: PlaywrightExecutor,
) -> None:
    shipped = ShippedCatalogues().get(1)
    assert shipped is not None
    iphone = shipped.devices["iPhone 13"]  # an item without a catalogue: version 1
    profile = DeviceProfile(name="iPhone 13", locale="de-DE", timezone="Europe/Berlin")
    settings = JobSettings(session_seconds=0.5, devices=(profile,), human_surfing=False)
    with recording_site(pages={"/": REPORTING_PAGE, "/report": "ok"}) as site:
        result = await executor.run(work_item(f"{site.base_url}/", settings), Recorded())
        (seen,) = reports(site.requests)
        headers = [h for _, h in site.requests]

    assert seen["ua"] == f"{iphone['user_agent']} TrafficBuster/{VERSION}"
    viewport = iphone["viewport"]
    assert (int(seen["w"]), int(seen["h"])) == (viewport["width"], viewport["height"])
    assert float(seen["dpr"]) == iphone["device_scale_factor"]
    assert int(seen["touch"]) > 0
    assert (seen["lang"], seen["tz"]) == ("de-DE", "Europe/Berlin")
    assert all(h.get("x-trafficbuster") == "job-behaviour" for h in headers)  # invariant 5
    assert all(h["user-agent"].endswith(f" TrafficBuster/{VERSION}") for h in headers)
    assert result.device == "iPhone 13"


@pytest.mark.slow
@needs_chromium
async def test_a_flow_presents_the_device_of_its_jobs_catalogue_version(
    executor: PlaywrightExecutor, tmp_path: Path
) -> None:
    shipped = with_version_1(tmp_path)
    second = add_version_2(shipped)
    first = shipped.get(1)
    assert first is not None
    refs = (first.ref, CatalogueVersion(version=2, sha256=content_sha256(second)))
    settings = JobSettings(
        session_seconds=0.2, devices=(DeviceProfile(name=IPHONE),), human_surfing=False
    )
    before, executor.catalogues = executor.catalogues, shipped
    try:
        with recording_site(pages={"/": REPORTING_PAGE, "/report": "ok"}) as site:
            for ref in refs:
                item = work_item(f"{site.base_url}/", settings)
                await executor.run(msgspec.structs.replace(item, device_catalogue=ref), Recorded())
            seen = reports(site.requests)
    finally:
        executor.catalogues = before
    assert [s["ua"] for s in seen] == [
        f"{first.devices[IPHONE]['user_agent']} TrafficBuster/{VERSION}",
        f"{IPHONE_V2_AGENT} TrafficBuster/{VERSION}",
    ]


@pytest.mark.slow
@needs_chromium
async def test_platform_switching_rotates_profiles_and_keeps_the_identifying_suffix(
    executor: PlaywrightExecutor,
) -> None:
    desktop = DeviceProfile(name="default", viewport=Viewport(width=1000, height=700))
    custom = DeviceProfile(name="Pixel 7", user_agent="ExampleBrowser/1.0")
    settings = JobSettings(
        session_seconds=0.2,
        devices=(desktop, custom),
        platform_switching=True,
        human_surfing=False,
    )
    with recording_site(pages={"/": REPORTING_PAGE, "/report": "ok"}) as site:
        results = [
            await executor.run(work_item(f"{site.base_url}/", settings, seed=s), Recorded())
            for s in (0, 1, 2)  # seeds that draw both profiles
        ]
        seen = reports(site.requests)

    assert {r.device for r in results} == {"default", "Pixel 7"}
    agents = {s["ua"] for s in seen}
    assert f"ExampleBrowser/1.0 TrafficBuster/{VERSION}" in agents
    assert all(a.endswith(f" TrafficBuster/{VERSION}") for a in agents)
    assert {(s["w"], s["h"]) for s in seen if s["ua"].startswith("Mozilla")} == {("1000", "700")}


# -- pages, clicks, referrer, delay ---------------------------------------------------


@pytest.mark.slow
@needs_chromium
async def test_page_traffic_external_clicks_referrer_and_traffic_delay(
    executor: PlaywrightExecutor,
) -> None:
    settings = JobSettings(
        session_seconds=1.2,
        page_traffic=3,
        external_click_ratio=1.0,
        traffic_delay=SecondsRange(min_seconds=0.5, max_seconds=0.5),
    )
    with (
        recording_site(
            "127.0.0.3", pages={"/": tall("<a href='/more'>more</a>"), "/more": tall("end")}
        ) as partner,
        recording_site(
            pages={
                "/": tall(f"<a href='/more'>more</a> <a href='{partner.base_url}/'>partner</a>"),
                "/more": tall("<a href='/'>home</a>"),
            }
        ) as site,
    ):
        item = work_item(
            f"{site.base_url}/",
            settings,
            clicks=1,
            hosts=("127.0.0.1", "127.0.0.3"),
            referrer="https://campaign.example/landing",
            # each host's consent covers the port it serves on
            ports={"127.0.0.1": [site.port], "127.0.0.3": [partner.port]},
        )
        report = Recorded()
        started = time.monotonic()
        result = await executor.run(item, report)

    assert site.arrived[0] - started >= 0.5 and result.delay_ms == 500
    assert site.requests[0][1].get("referer") == "https://campaign.example/landing"
    assert (result.clicks_done, result.pages) == (1, 3)
    ((href, link),) = report.clicks
    assert href == f"{partner.base_url}/" and link == LinkPick(index=0, candidates=1, external=True)
    # the third page is opened by a link of the partner's page, not clicked: not a click
    assert [url for url, _, _ in report.visits] == [
        f"{site.base_url}/",
        f"{partner.base_url}/",
        f"{partner.base_url}/more",
    ]
    assert [url for url, _, _ in report.left] == [url for url, _, _ in report.visits]


@needs_chromium
async def test_without_human_surfing_a_flow_only_dwells(executor: PlaywrightExecutor) -> None:
    settings = JobSettings(session_seconds=1.0, human_surfing=False, page_traffic=2)
    report = await browse(executor, SHOP, settings)
    assert len(report.left) == 2
    assert all(t.scrolls == t.moves == t.pauses_ms == [] for _, t, _ in report.left)


# -- page timings ---------------------------------------------------------------------

TIMED_PAGE = """<!doctype html><html><body>
<h1 style='font-size:64px'>Largest text of the page</h1>
<button id='slow' onclick='const t = performance.now(); while (performance.now() - t < 120) {}'>
  slow</button>
<script>
// a shift counts only once the page has painted: the banner comes after the first paint
new PerformanceObserver((entries, observer) => {
  observer.disconnect();
  setTimeout(() => {
    const banner = document.createElement('div');
    banner.style.height = '200px';
    banner.textContent = 'late banner';
    document.body.prepend(banner);
  }, 0);
}).observe({type: 'paint', buffered: true});
</script>
<a href='/'>again</a>
</body></html>"""


@needs_chromium
async def test_page_visited_carries_navigation_timing_and_web_vitals(
    executor: PlaywrightExecutor,
) -> None:
    settings = JobSettings(session_seconds=1.0, human_surfing=False)
    report = await browse(executor, {"/": TIMED_PAGE}, settings)

    ((_, status, arrival),) = report.visits
    assert status == 200 and arrival is not None
    assert arrival.ttfb_ms is not None and arrival.ttfb_ms > 0
    assert arrival.dom_content_loaded_ms is not None and arrival.load_ms is not None
    assert arrival.ttfb_ms <= arrival.dom_content_loaded_ms <= arrival.load_ms
    assert arrival.fcp_ms is not None and arrival.lcp_ms is not None
    assert arrival.inp_ms is None  # nothing was clicked yet: not measurable
    ((_, _, left),) = report.left
    assert left is not None and left.cls is not None and left.cls > 0  # the late banner


@needs_chromium
async def test_interaction_to_next_paint_is_measured_after_an_interaction(
    executor: PlaywrightExecutor,
) -> None:
    from agents.page_metrics import VITALS_SCRIPT, read_timings

    assert executor._browser is not None
    context = await executor._browser.new_context()
    try:
        await context.add_init_script(VITALS_SCRIPT)
        page = await context.new_page()
        with recording_site(pages={"/": TIMED_PAGE}) as site:
            await page.goto(f"{site.base_url}/")
            await page.click("#slow")
            # event timing entries are delivered after the next paint
            await page.wait_for_function("window.__trafficbusterVitals.events.size > 0")
            timings = await read_timings(page)
    finally:
        await context.close()
    assert timings is not None and timings.inp_ms is not None and timings.inp_ms >= 100


HOSTILE_PAGE = """<!doctype html><html><body><p>no frames, no timers</p><script>
window.requestAnimationFrame = () => 0;
window.setTimeout = () => 0;
window.__trafficbusterVitals = { flush() { throw new Error('mine'); } };
</script></body></html>"""


@needs_chromium
async def test_a_page_that_takes_away_timers_and_frames_does_not_hold_the_flow(
    executor: PlaywrightExecutor,
) -> None:
    settings = JobSettings(session_seconds=0.5, human_surfing=False)
    started = time.monotonic()
    report = await browse(executor, {"/": HOSTILE_PAGE}, settings)
    assert time.monotonic() - started < 0.5 + 2 * 3.0 + 3  # session, two bounded reads
    ((_, status, _),) = report.visits
    assert status == 200 and len(report.left) == 1
