"""A bucket followed in memory: undecodable values count as absent and never stop the
watch; sessions and API keys built on it fail closed on a record nobody can read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from engine.bus import Bus
from engine.identity.api_keys import ApiKeys
from engine.identity.buckets import API_KEYS_BUCKET, SESSIONS_BUCKET, bucket
from engine.identity.sessions import Sessions, token_key
from engine.kv_mirror import KvMirror


class Record(msgspec.Struct, frozen=True):
    n: int


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "not within the time"
        await asyncio.sleep(0.02)


async def test_undecodable_values_count_as_absent_and_the_watch_goes_on(bus: Bus) -> None:
    kv = await bucket(bus, "tb_test_mirror")
    await kv.put("a", msgspec.json.encode(Record(1)))
    await kv.put("bad", b"{not json")
    ended: list[str] = []
    mirror = KvMirror(
        kv,
        msgspec.json.Decoder(Record).decode,
        "test",
        on_delete=lambda key, _: ended.append(key),
    )
    await mirror.start()
    try:
        assert mirror.get("a") == Record(1) and mirror.get("bad") is None
        await kv.put("a", b'{"n": "not a number"}')  # a held record turns unreadable
        await until(lambda: mirror.get("a") is None)
        assert ended == ["a"]
        await kv.put("b", msgspec.json.encode(Record(2)))  # the watch still runs
        await until(lambda: mirror.get("b") == Record(2))
        await kv.delete("b")
        await until(lambda: mirror.get("b") is None)
    finally:
        await mirror.stop()


async def test_a_key_deleted_while_the_watch_was_down_is_forgotten_at_its_restart(
    bus: Bus,
) -> None:
    kv = await bucket(bus, "tb_test_restart")
    await kv.put("a", msgspec.json.encode(Record(1)))
    await kv.put("b", msgspec.json.encode(Record(2)))
    mirror = KvMirror(kv, msgspec.json.Decoder(Record).decode, "test")
    await mirror.start()
    await mirror.stop()
    await kv.purge("a")  # while no watch runs
    mirror.records["stale"] = Record(9)
    await mirror.start()
    try:
        assert dict(mirror.items()) == {"b": Record(2)}
    finally:
        await mirror.stop()


async def test_a_session_or_key_nobody_can_read_lets_nobody_in(bus: Bus) -> None:
    sessions = Sessions(await bucket(bus, SESSIONS_BUCKET))
    keys = ApiKeys(await bucket(bus, API_KEYS_BUCKET))
    await sessions.start()
    await keys.start()
    try:
        now = time.time()
        token, _ = await sessions.create("user_a", "s1", "interactive", now)
        key, record = await keys.create("user_a", "script", [], now)
        assert await sessions.find(token, now) is not None
        assert await keys.find(key) is not None
        await sessions.kv.put(token_key(token), b"\xff garbage")
        await keys.kv.put(record.key_id, b"[]")
        await until(lambda: sessions.held.get(token_key(token)) is None)
        await until(lambda: keys.get(record.key_id) is None)
        assert await sessions.find(token, now) is None  # read from the bucket: still nobody
        assert await keys.find(key) is None
        other, _ = await sessions.create("user_b", "s2", "interactive", now)
        assert await sessions.find(other, now) is not None  # the rest goes on working
    finally:
        await sessions.stop()
        await keys.stop()
