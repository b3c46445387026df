"""The same job seed and flow index give the same scrolls, moves and clicks, as the
flows' events record them: two jobs with one seed, run through the whole system
(API-level settings, dispatcher, runner, real Chromium, a site on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from engine.bus import Bus
from schemas import subjects
from schemas.events import ClickDone, FlowDone, PageLeft
from schemas.values import SecondsRange, SessionDuration, Target
from tests.conftest import NatsServer
from tests.harness import embedded
from tests.sites import recording_site
from tests.test_executor import chromium, needs_chromium
from tests.test_flow_behaviour import SHOP, VERSION

__all__ = ["chromium"]  # the fixture the browser test needs

pytestmark = pytest.mark.timeout(120)


def journeys(events: list[object]) -> dict[str, list[tuple[object, ...]]]:
    """Each flow's recorded choices by its index in the job, in order."""
    by_flow: dict[str, list[tuple[object, ...]]] = {}
    for event in events:
        if isinstance(event, PageLeft):
            step = ("page", event.n, tuple(event.scrolls), tuple(event.pauses_ms))
            by_flow.setdefault(event.flow_id, []).append((*step, tuple(event.moves)))
        elif isinstance(event, ClickDone):
            by_flow.setdefault(event.flow_id, []).append(("click", event.n, event.href, event.link))
    return {flow.split("_", 2)[-1]: sorted(steps, key=repr) for flow, steps in by_flow.items()}


async def job_events(bus: Bus, job_id: str) -> list[object]:
    return [
        env.event
        async for batch in bus.read(1, subjects.flow_subject(job_id, "*"), follow=False)
        for env in batch
    ]


@pytest.mark.slow
@needs_chromium
async def test_same_job_seed_and_flow_index_give_the_same_scrolls_moves_and_clicks(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = {
        "instance_count": 2,
        "seed": 1234,
        "session_duration": SessionDuration(mode="variable", min_seconds=3.5, max_seconds=4.5),
        "page_traffic": 2,
        "click_timing": SecondsRange(min_seconds=1.0, max_seconds=1.5),
    }
    with recording_site(pages=SHOP) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=4)
            tb.run(runner.run(), "runner")
            target = Target(url=f"{site.base_url}/", flows=2, clicks=1)
            first = await tb.create_job([target], **settings)
            again = await tb.create_job([target], **settings)
            for job_id in (first, again):
                await tb.wait_job(job_id, lambda v: v.status == "completed", timeout=60)
            runs = [journeys(await job_events(bus, job_id)) for job_id in (first, again)]
            done = [e for e in await job_events(bus, first) if isinstance(e, FlowDone)]

    assert runs[0].keys() == {"0_0", "0_1"}
    assert runs[0] == runs[1]  # flow by flow, the same choices
    assert runs[0]["0_0"] != runs[0]["0_1"]  # and another flow index, others
    for steps in runs[0].values():
        pages = [s for s in steps if s[0] == "page"]
        clicks = [s for s in steps if s[0] == "click"]
        assert len(pages) == 2 and len(clicks) == 1  # page traffic 2, left by a click
    pages = [s for steps in runs[0].values() for s in steps if s[0] == "page"]
    assert any(s[2] for s in pages) and any(s[4] for s in pages)  # scrolls and moves
    assert {e.device for e in done} == {"default"}
