"""A job in real Chromium whose pages reach for a port their consent does not cover:
the runner's egress proxy refuses it, the log holds EgressRefused, the job counts them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.playwright_flow import PlaywrightExecutor
from agents.runner import Runner
from engine.bus import Bus
from schemas import VERSION, subjects
from schemas.events import EgressRefused
from schemas.values import Target
from tests.conftest import NatsServer, free_port
from tests.harness import embedded
from tests.sites import recording_site
from tests.test_executor import chromium, needs_chromium

__all__ = ["chromium"]


@pytest.mark.slow
@needs_chromium
async def test_refusals_of_a_jobs_flows_are_on_the_log_and_counted(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    other = free_port()  # 127.0.0.1 is consented, on the site's port only
    page = f"<script>fetch('http://127.0.0.1:{other}/beacon').catch(() => 0)</script>"
    with recording_site(pages={"/": page}) as site:
        async with embedded(bus, nats_server.url, tmp_path) as tb:
            await tb.authorise("127.0.0.1", on=site)
            runner = Runner(bus, PlaywrightExecutor(VERSION), slots=2)
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=2)], instance_count=2, session_seconds=0.5
            )
            view = await tb.wait_terminal(job_id, timeout=90)
            runner.stop()
            refused: list[tuple[EgressRefused, str]] = []
            kind = subjects.flow_subject(job_id, "EgressRefused")
            async for batch in bus.read(1, kind, follow=False):
                refused += [
                    (e.event, e.msg_id) for e in batch if isinstance(e.event, EgressRefused)
                ]
            # a refusal reported as its flow ended may be projected after the job's end
            counted = await tb.wait_job(job_id, lambda v: v.egress_refused >= len(refused), 10)

    assert view.status == "completed" and view.flows_done == 2
    assert {(e.host, e.port, e.reason) for e, _ in refused} == {
        ("127.0.0.1", other, "port not consented")
    }
    assert {e.request for e, _ in refused} == {f"GET http://127.0.0.1:{other}/beacon"}
    assert {m for _, m in refused} == {f"{e.flow_id}:1:EgressRefused:0" for e, _ in refused}
    assert len({e.flow_id for e, _ in refused}) == 2
    assert counted.egress_refused == len(refused) == 2
