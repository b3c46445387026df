"""Flows in real Chromium behind hostile upstream proxies on 127.0.0.1: candidates that
never answer fail the flow "proxy" within the connect timeouts, never directly; one that
answers 200 and closes every tunnel fails the flow without it ever reaching the site; a
credential echoed by a proxy stays out of the flow's reports."""

from __future__ import annotations

import asyncio
import time

import pytest

from agents.egress import upstream
from agents.executor import FlowError
from agents.playwright_flow import PlaywrightExecutor
from schemas.proxies import ProxyEndpoint
from tests.proxies import LocalProxy, Secrets, serving
from tests.test_executor import (
    RecordedReport,
    RecordingSite,
    chromium,
    flow,
    needs_chromium,
    site,
)
from tests.test_proxy_flows import executor, secrets, through
from tests.test_proxy_hostile import PASSWORD, answering, never_answers, scripted

__all__ = ["chromium", "executor", "secrets", "site"]


class ReasonsReport(RecordedReport):
    """A flow's reports, with each ProxyFailed reason kept as it would be published."""

    reasons: list[str]

    async def proxy_failed(self, proxy_id: str, proxy: str, error: str, reason: str) -> None:
        self.__dict__.setdefault("reasons", []).append(reason)
        await super().proxy_failed(proxy_id, proxy, error, reason)


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_silent_candidates_fail_the_flow_within_their_timeouts(
    executor: PlaywrightExecutor,
    secrets: Secrets,
    site: RecordingSite,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "CONNECT_TIMEOUT", 0.5)
    url = site.page("/", "<h1>behind silence</h1>")
    async with scripted(never_answers) as one, scripted(never_answers) as two:
        secrets["silent1"] = ProxyEndpoint("http", one.host, one.port)
        secrets["silent2"] = ProxyEndpoint("socks5", two.host, two.port, "user", PASSWORD)
        report = RecordedReport()
        started = time.monotonic()
        with pytest.raises(FlowError) as failed:
            await executor.run(through(flow(url), "silent1", "silent2"), report)
        elapsed = time.monotonic() - started
    assert failed.value.reason == "proxy: all 2 proxy candidates failed"
    assert report.proxy_failures == [("silent1", "timeout"), ("silent2", "timeout")]
    assert elapsed < 10
    assert site.paths() == []


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_proxy_that_closes_every_tunnel_never_lets_the_flow_reach_the_site(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>behind a liar</h1>")
    async with scripted(answering(b"HTTP/1.1 200 Connection established\r\n\r\n")) as liar:
        secrets["liar"] = ProxyEndpoint("http", liar.host, liar.port)
        report = RecordedReport()
        with pytest.raises(FlowError):
            await executor.run(through(flow(url), "liar"), report)
    assert liar.connections >= 1 and site.paths() == []


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_proxy_echoing_its_credentials_keeps_them_out_of_the_flows_reports(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>behind an echo</h1>")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 " + head.replace(b"\r\n", b" ") + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    async with serving(LocalProxy(0), echo) as echoing:
        secrets["echo"] = ProxyEndpoint("http", echoing.host, echoing.port, "user", PASSWORD)
        report = ReasonsReport()
        with pytest.raises(FlowError) as failed:
            await executor.run(through(flow(url), "echo"), report)
    assert failed.value.reason == "proxy: all 1 proxy candidates failed"
    assert report.reasons == [f"{secrets['echo'].label} answered CONNECT with 403"]
    assert PASSWORD not in repr(failed.value)
    assert site.paths() == []
