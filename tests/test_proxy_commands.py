"""Registering and retiring under concurrency and retries: one command, one effect."""

from __future__ import annotations

import asyncio

import pytest

from engine.bus import Bus
from engine.errors import CommandIdReused, Conflict
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands, proxy_id_for
from schemas import subjects
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
