"""Flows in real Chromium chained through upstream proxies on 127.0.0.1: a dead port, one
that answers every CONNECT with 502, a SOCKS5 one with username and password and a
working HTTP one. A flow goes on with the next candidate when one fails (ProxyFailed
each time), never connects directly, and fails with reason "proxy" when none is left;
in a job the engine marks the failing ones bad and stops handing them out. A host on
the proxy's bypass list is reached directly; a proxy that resolves names is handed the
name; a proxies dataset's rows reach the runner with both, its disabled rows never."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import pytest_asyncio

from agents.executor import FlowError
from agents.playwright_flow import PlaywrightExecutor
from agents.proxy_failover import ProxySecretCache
from agents.runner import Runner
from engine.bus import Bus
from engine.datasets.proxy_pool import pool_of
from engine.proxies.decider import HealthPolicy
from engine.proxies.health import ProxyHealth
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands
from schemas import subjects
from schemas.datasets import ProxyRow
from schemas.events import FlowDispatched, ProxyFailed, ProxyMarkedBad, ProxyRegistered
from schemas.proxies import ProxyEndpoint
from schemas.values import DatasetRef, ProxyPool, Target
from tests.conftest import NatsServer
from tests.harness import embedded
from tests.proxies import Secrets, dead_port, http_proxy, socks5_proxy
from tests.sites import recording_site
from tests.test_executor import (
    VERSION,
    RecordedReport,
    RecordingSite,
    chromium,
    flow,
    needs_chromium,
    port_of,
    site,
)

__all__ = ["chromium", "site"]
E = TypeVar("E")
USER, PASSWORD = "flow-user", "s3cret-Pa55word"
# a flow on "localhost": the name consented, and each address the runner may find for it
BY_NAME = ("localhost", "127.0.0.1", "::1")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secrets() -> Secrets:
    return Secrets()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def executor(secrets: Secrets) -> AsyncIterator[PlaywrightExecutor]:
    ex = PlaywrightExecutor(VERSION, proxy_secrets=secrets)
    await ex.start()
    yield ex
    await ex.close()


def through(item: FlowDispatched, *proxy_ids: str) -> FlowDispatched:
    return msgspec.structs.replace(item, proxies=list(proxy_ids))


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_flow_goes_on_with_the_next_candidate_until_one_works(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>through a proxy</h1>")
    async with (
        http_proxy(answer=502) as gateway,
        socks5_proxy(USER, PASSWORD) as socks,
        http_proxy() as plain,
    ):
        secrets["dead"] = ProxyEndpoint("http", "127.0.0.1", dead_port())
        secrets["gateway"] = ProxyEndpoint("http", gateway.host, gateway.port)
        secrets["socks"] = ProxyEndpoint("socks5", socks.host, socks.port, USER, PASSWORD)
        secrets["plain"] = ProxyEndpoint("http", plain.host, plain.port)
        report = RecordedReport()

        result = await executor.run(through(flow(url), "dead", "gateway", "socks", "plain"), report)

        assert result.pages == 1 and report.visits == [(url, 200)]
        assert report.proxy_failures == [("dead", "unreachable"), ("gateway", "refused")]
        assert socks.tunnels and {t[0] for t in socks.tunnels} == {"127.0.0.1"}
        assert not plain.tunnels  # the flow stayed on the first that worked
        assert site.paths() == ["/"]

        # the plain HTTP one carries a flow just as well
        report = RecordedReport()
        await executor.run(through(flow(url), "plain"), report)
        assert plain.tunnels and not report.proxy_failures
        assert site.paths() == ["/", "/"]


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_flow_whose_candidates_all_fail_fails_and_never_goes_direct(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>unreachable</h1>")
    async with http_proxy(answer=502) as gateway:
        secrets["dead2"] = ProxyEndpoint("http", "127.0.0.1", dead_port())
        secrets["gateway2"] = ProxyEndpoint("http", gateway.host, gateway.port)
        report = RecordedReport()
        with pytest.raises(FlowError) as failed:
            await executor.run(through(flow(url), "dead2", "gateway2", "unknown"), report)
    assert failed.value.reason == "proxy: all 3 proxy candidates failed"
    assert failed.value.retryable
    assert report.proxy_failures == [
        ("dead2", "unreachable"),
        ("gateway2", "refused"),
        ("unknown", "no_secret"),
    ]
    assert site.paths() == []


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_runner_that_cannot_read_proxy_secrets_fails_such_flows_closed(
    site: RecordingSite,
) -> None:
    url = site.page("/", "<h1>never</h1>")
    executor = PlaywrightExecutor(VERSION)  # no secrets source
    await executor.start()
    try:
        with pytest.raises(FlowError) as failed:
            await executor.run(through(flow(url), "any"), RecordedReport())
    finally:
        await executor.close()
    assert failed.value.reason.startswith("guard: ")
    assert site.paths() == []


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_host_on_the_proxys_bypass_list_is_reached_directly_and_the_proxy_sees_nothing(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>bypassed</h1>")
    async with http_proxy() as upstream:
        secrets["bypassing"] = ProxyEndpoint(
            "http", upstream.host, upstream.port, bypass=("127.0.0.1",)
        )
        report = RecordedReport()
        result = await executor.run(through(flow(url), "bypassing"), report)
    assert result.pages == 1 and report.visits == [(url, 200)]
    assert upstream.connections == 0 and not report.proxy_failures
    assert site.paths() == ["/"]


@needs_chromium
@pytest.mark.asyncio(loop_scope="module")
async def test_a_proxy_that_resolves_names_is_handed_the_name_not_an_address(
    executor: PlaywrightExecutor, secrets: Secrets, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>by name</h1>").replace("127.0.0.1", "localhost")
    port = port_of(url)
    async with http_proxy() as connect, socks5_proxy(USER, PASSWORD) as socks:
        secrets["named-http"] = ProxyEndpoint("http", connect.host, connect.port, dns="proxy")
        secrets["named-socks"] = ProxyEndpoint(
            "socks5", socks.host, socks.port, USER, PASSWORD, dns="proxy"
        )
        for proxy_id in ("named-http", "named-socks"):
            report = RecordedReport()
            await executor.run(through(flow(url, allowed_hosts=BY_NAME), proxy_id), report)
            assert report.visits == [(url, 200)] and not report.proxy_failures
    # CONNECT localhost:port, and SOCKS5's domain-name address type
    assert connect.tunnels == socks.tunnels == [("localhost", port)]
    assert site.paths() == ["/", "/"]


@needs_chromium
async def test_proxy_rows_reach_the_runner_with_bypass_and_dns_and_disabled_rows_never_do(
    bus: Bus, site: RecordingSite
) -> None:
    url = site.page("/", "<h1>from rows</h1>")
    commands = ProxyCommands(bus, ProxySecrets(bus))
    async with http_proxy() as bypassed, socks5_proxy(USER, PASSWORD) as named:
        rows = [
            ProxyRow(scheme="http", host="127.0.0.1", port=dead_port(), enabled=False),
            ProxyRow(
                scheme="http", host=bypassed.host, port=bypassed.port, bypass=["127.0.0.1"]
            ),
            ProxyRow(
                scheme="socks5", host=named.host, port=named.port, username=USER,
                password=PASSWORD, dns="proxy",
            ),
        ]  # fmt: skip
        pool = await pool_of(commands, DatasetRef(id="ds_rows", version=1), rows, "test")
        executor = PlaywrightExecutor(VERSION, proxy_secrets=ProxySecretCache(bus))
        await executor.start()
        try:
            direct, by_name = RecordedReport(), RecordedReport()
            await executor.run(through(flow(url), pool.ids[0]), direct)
            named_url = url.replace("127.0.0.1", "localhost")
            await executor.run(
                through(flow(named_url, allowed_hosts=BY_NAME), pool.ids[1]), by_name
            )
        finally:
            await executor.close()
    assert len(pool.ids) == 2  # the disabled row is not registered
    assert direct.visits == [(url, 200)] and bypassed.connections == 0
    assert by_name.visits == [(named_url, 200)]
    assert named.tunnels == [("localhost", port_of(url))]
    registered = await events_of(bus, subjects.ALL_PROXIES, ProxyRegistered, 2)
    assert [(e.proxy_id, e.bypass, e.dns) for e in registered] == [
        (pool.ids[0], ["127.0.0.1"], "local"),
        (pool.ids[1], [], "proxy"),
    ]
    stream = await bus.js.stream_info(subjects.EVENTS_STREAM)
    for seq in range(1, stream.state.last_seq + 1):
        assert PASSWORD.encode() not in (
            (await bus.js.get_msg(subjects.EVENTS_STREAM, seq)).data or b""
        )


@pytest.mark.slow
@needs_chromium
async def test_a_jobs_flows_fail_over_and_the_engine_marks_the_bad_proxies(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    flows = 4
    with recording_site(pages={"/": "<h1>proxied</h1>"}) as site:
        async with (
            embedded(bus, nats_server.url, tmp_path) as tb,
            http_proxy(answer=502) as gateway,
            socks5_proxy(USER, PASSWORD) as socks,
            http_proxy() as plain,
        ):
            await tb.authorise("127.0.0.1", on=site)
            ids = []
            for url in (
                f"http://127.0.0.1:{dead_port()}",
                gateway.url("http"),
                socks.url("socks5", f"{USER}:{PASSWORD}"),
                plain.url("http"),
            ):
                registered, _ = await commands.register(url, None, "test")
                ids.append(registered.proxy_id)
            dead, bad_gateway, working, _ = ids
            policy = HealthPolicy(failures=2, cooldown=timedelta(minutes=10))
            tb.run(ProxyHealth(bus, policy).run(), "proxy health")
            runner = Runner(bus, PlaywrightExecutor(VERSION, proxy_secrets=ProxySecretCache(bus)))
            tb.run(runner.run(), "runner")
            job_id = await tb.create_job(
                [Target(url=f"{site.base_url}/", flows=flows)],
                instance_count=1,
                session_seconds=0.3,
                proxies=ProxyPool(ids=ids),
            )
            view = await tb.wait_terminal(job_id, timeout=120)
            runner.stop()
            marked = await events_of(bus, subjects.ALL_PROXIES, ProxyMarkedBad, 2)
            failed = await events_of(bus, subjects.ALL_PROXY_FAILURES, ProxyFailed, 0)
            stream = await bus.js.stream_info(subjects.EVENTS_STREAM)
            raw = [
                (await bus.js.get_msg(subjects.EVENTS_STREAM, seq)).data or b""
                for seq in range(1, stream.state.last_seq + 1)
            ]

    assert view.status == "completed" and view.flows_done == flows
    assert len(site.requests) == flows and len(socks.tunnels) >= flows and not plain.tunnels
    assert {e.proxy_id for e in marked} == {dead, bad_gateway}
    assert {(e.proxy_id, e.error) for e in failed} == {
        (dead, "unreachable"),
        (bad_gateway, "refused"),
    }
    # each flow that still had them tried both before the working one, in order
    by_flow: dict[str, list[str | None]] = {}
    for e in failed:
        by_flow.setdefault(e.flow_id, []).append(e.proxy_id)
    assert all(tried == [dead, bad_gateway] for tried in by_flow.values())
    assert working not in {e.proxy_id for e in failed}
    assert not any(PASSWORD.encode() in data for data in raw)


async def events_of(bus: Bus, subject: str, kind: type[E], at_least: int) -> list[E]:
    """The events of ``kind`` on ``subject``, waiting until there are ``at_least``."""
    async with asyncio.timeout(20):
        while True:
            found: list[E] = []
            async for batch in bus.read(1, subject, follow=False):
                found += [env.event for env in batch if isinstance(env.event, kind)]
            if len(found) >= at_least:
                return found
            await asyncio.sleep(0.2)
