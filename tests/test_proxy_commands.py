"""Registering and retiring under concurrency and retries: one command, one effect."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.bus import Bus, Expect
from engine.errors import CommandIdReused, Conflict
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands, proxy_id_for
from projections.projector import Projector
from projections.replay import dump_tables, rebuild
from schemas import subjects
from schemas.events import ProxyCheckFailed, ProxyFailed, ProxyMarkedBad, ProxyRestored
from schemas.proxies import parse_proxy_url

URL = "socks5://bob:Hunter2-Pw@127.0.0.1:1080"


async def kinds(bus: Bus, proxy_id: str) -> list[str]:
    envelopes = await bus.load(subjects.proxy_stream_filter(proxy_id))
    return [type(env.event).__name__ for env in envelopes]


async def test_concurrent_retries_of_one_registration_make_one_proxy(bus: Bus) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    answers = await asyncio.gather(
        *(commands.register(URL, "eu", "test", "import-7") for _ in range(10))
    )
    assert {event.proxy_id for event, _ in answers} == {proxy_id_for("import-7")}
    assert len({ack.seq for _, ack in answers}) == 1
    assert await kinds(bus, proxy_id_for("import-7")) == ["ProxyRegistered"]


async def test_a_registration_whose_secret_was_stored_before_a_crash_completes(bus: Bus) -> None:
    secrets = ProxySecrets(bus)
    pid = proxy_id_for("import-8")
    await secrets.store(pid, parse_proxy_url(URL))  # then the process died
    event, _ = await ProxyCommands(bus, secrets).register(URL, None, "test", "import-8")
    assert event.proxy_id == pid and await kinds(bus, pid) == ["ProxyRegistered"]
    with pytest.raises(CommandIdReused):  # the key now names this proxy, not another
        await ProxyCommands(bus, secrets).register(
            "http://127.0.0.1:3128", None, "test", "import-8"
        )
    assert await secrets.get(pid) == parse_proxy_url(URL)  # untouched by the refused one


async def test_concurrent_retires_retire_once(bus: Bus) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    registered, _ = await commands.register(URL, None, "test")
    results = await asyncio.gather(
        *(commands.retire(registered.proxy_id, "gone", "test") for _ in range(8)),
        return_exceptions=True,
    )
    succeeded = [r for r in results if not isinstance(r, BaseException)]
    assert len(succeeded) == 1
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert await kinds(bus, registered.proxy_id) == ["ProxyRegistered", "ProxyRetired"]
    assert await ProxySecrets(bus).get(registered.proxy_id) is None


async def test_the_proxy_list_rebuilt_from_the_log_equals_the_live_one(
    bus: Bus, tmp_path: Path
) -> None:
    commands = ProxyCommands(bus, ProxySecrets(bus))
    kept, _ = await commands.register(URL, "eu", "test")
    gone, _ = await commands.register("http://127.0.0.1:3128", None, "test")
    await commands.retire(gone.proxy_id, "gone", "test")
    pid, at = kept.proxy_id, datetime.now(UTC)
    scope = subjects.proxy_stream_filter(pid)
    version = (await commands.load(pid)).version
    for n in range(2):
        failed = ProxyFailed(
            id=f"f{n}", at=at, actor="r", job_id="job_1", flow_id="job_1_0_0", attempt=1,
            proxy="p", reason="refused", n=n, proxy_id=pid, error="refused",
        )  # fmt: skip
        await bus.append(failed, msg_id=subjects.flow_msg_id(failed, n))
    later = at + timedelta(seconds=30)
    for event in (
        ProxyMarkedBad(
            id="b", at=at, actor="system", proxy_id=pid, failures=2, window_seconds=60,
            bad_until=later,
        ),
        ProxyCheckFailed(id="c", at=later, actor="system", proxy_id=pid, reason="x",
                         bad_until=later + timedelta(seconds=60)),
        ProxyRestored(id="r", at=later + timedelta(seconds=60), actor="system", proxy_id=pid),
    ):  # fmt: skip
        version = (await bus.append(event, msg_id=event.id, expect=Expect(scope, version))).seq
    db_path = tmp_path / "read.db"
    projector = Projector(bus, db_path)
    await projector.start()
    await projector.wait_for(await bus.last_seq(), timeout=10)
    await projector.stop()
    live = await dump_tables(db_path)
    assert [row[6] for row in live["proxies"]] == ["ok", "retired"]  # status, by id order
    await asyncio.to_thread(db_path.unlink)
    await rebuild(bus, db_path)
    assert await dump_tables(db_path) == live
