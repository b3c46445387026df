"""Which proxies the dispatcher puts in work items: usable ones of the job's pool, rotated
per flow with switching, none that is bad or retired; flows wait while none is usable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from engine.dispatch import snapshot
from engine.dispatch.state import DispatchState
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    Envelope,
    FlowDispatched,
    JobCreated,
    JobStarted,
    ProxyFailed,
    ProxyMarkedBad,
    ProxyRegistered,
    ProxyRestored,
    ProxyRetired,
    TbEvent,
    decode_event,
    encode_event,
)
from schemas.stored import Undecodable, decode_stored
from schemas.values import JobSettings, ProxyPool, Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class World:
    def __init__(self) -> None:
        self.state = DispatchState()
        self.seq = 0

    def add(self, event: TbEvent) -> int:
        self.seq += 1
        self.state.apply(Envelope(self.seq, subjects.subject_for(event), event))
        return self.seq

    def proxy(self, pid: str, label: str | None = None) -> None:
        self.add(
            ProxyRegistered(
                id="p", at=NOW, actor="t", proxy_id=pid, scheme="http", host="127.0.0.1",
                port=3128, label=label,
            )
        )  # fmt: skip

    def bad(self, pid: str) -> None:
        self.add(
            ProxyMarkedBad(
                id="b", at=NOW, actor="system", proxy_id=pid, failures=3, window_seconds=60,
                bad_until=NOW + timedelta(seconds=30),
            )
        )  # fmt: skip

    def job(self, flows: int, pool: ProxyPool | None, switching: bool = False) -> None:
        self.add(
            ConsentGiven(
                id="c", at=NOW, actor="t", domain="a.test", evidence="e",
                expires_at=NOW + timedelta(days=1),
            )
        )  # fmt: skip
        settings = JobSettings(instance_count=flows, proxies=pool, proxy_switching=switching)
        targets = [Target(url="http://a.test/", flows=flows)]
        self.add(
            JobCreated(
                id="j", at=NOW, actor="t", job_id="job_1", name="j", targets=targets,
                settings=settings,
            )
        )  # fmt: skip
        self.add(
            JobStarted(
                id="s", at=NOW, actor="t", job_id="job_1", flows_total=flows,
                allowed_hosts=["a.test"],
            )
        )  # fmt: skip

    def candidates(self) -> list[list[str] | None]:
        plan = self.state.jobs["job_1"]
        return [self.state.proxy_candidates(plan, d.flow_id, d.attempt) for d in self.planned()]

    def planned(self) -> list[object]:
        return self.state.dispatches(NOW)  # type: ignore[return-value]


def test_without_a_pool_flows_go_direct_whatever_proxies_exist() -> None:
    world = World()
    world.proxy("p1")
    world.job(3, None)
    assert world.candidates() == [[], [], []]


def test_switching_rotates_the_pool_per_flow_and_without_it_one_order_serves_all() -> None:
    for switching, expected in (
        (True, [["p1", "p2", "p3"], ["p2", "p3", "p1"], ["p3", "p1", "p2"], ["p1", "p2", "p3"]]),
        (False, [["p1", "p2", "p3"]] * 4),
    ):
        world = World()
        for pid in ("p1", "p2", "p3"):
            world.proxy(pid)
        world.job(4, ProxyPool(), switching)
        assert world.candidates() == expected


def test_bad_and_retired_proxies_are_never_candidates_and_flows_wait_for_a_usable_one() -> None:
    world = World()
    world.proxy("p1", "eu")
    world.proxy("p2", "eu")
    world.proxy("p3", "us")
    world.job(2, ProxyPool(label="eu"), switching=True)
    world.bad("p1")
    assert world.candidates() == [["p2"], ["p2"]]
    world.add(ProxyRetired(id="r", at=NOW, actor="t", proxy_id="p2"))
    assert "p2" not in world.state.proxies
    assert world.planned() == []  # no usable proxy labelled eu: the flows wait
    world.add(ProxyRestored(id="o", at=NOW + timedelta(seconds=31), actor="system", proxy_id="p1"))
    assert world.candidates() == [["p1"], ["p1"]]


def test_a_failure_report_alone_changes_nothing_for_dispatch() -> None:
    world = World()
    world.proxy("p1")
    world.job(1, ProxyPool(ids=["p1"]))
    world.add(
        ProxyFailed(
            id="f", at=NOW, actor="r", job_id="job_1", flow_id="job_1_0_0", attempt=1,
            proxy="http://127.0.0.1:3128", reason="refused", proxy_id="p1", error="refused",
        )
    )  # fmt: skip
    assert world.candidates() == [["p1"]]


def test_the_snapshot_keeps_the_proxies() -> None:
    world = World()
    world.proxy("p1")
    world.proxy("p2")
    world.bad("p2")
    world.job(2, ProxyPool(), switching=True)
    restored = snapshot.decode(snapshot.encode(world.state))
    assert restored is not None and restored.proxies == world.state.proxies
    world.state = restored
    assert world.candidates() == [["p1"], ["p1"]]


def test_events_decode_where_they_belong_and_older_shapes_still_do() -> None:
    registered = ProxyRegistered(
        id="p", at=NOW, actor="api", proxy_id="p1", scheme="socks5", host="proxy.example",
        port=1080, has_credentials=True, label="eu",
    )  # fmt: skip
    raw = encode_event(registered)
    assert decode_stored("tb.proxy.p1.ProxyRegistered", raw, None) == registered
    with pytest.raises(Undecodable):
        decode_stored("tb.proxy.p2.ProxyRegistered", raw, None)
    older_item = msgspec.json.decode(
        encode_event(
            FlowDispatched(
                id="d", at=NOW, actor="s", job_id="job_1", flow_id="job_1_0_0", attempt=1,
                target_index=0, url="http://a.test/", clicks=0, session_seconds=1,
                allowed_hosts=["a.test"], seed=1,
            )
        )
    )  # fmt: skip
    del older_item["proxies"]
    item = decode_event(msgspec.json.encode(older_item))
    assert isinstance(item, FlowDispatched) and item.proxies == []
    older_failure = {
        "type": "ProxyFailed", "id": "f", "at": "2026-01-01T00:00:00Z", "actor": "r",
        "job_id": "job_1", "flow_id": "job_1_0_0", "attempt": 1, "proxy": "p", "reason": "x",
    }  # fmt: skip
    failed = decode_event(msgspec.json.encode(older_failure))
    assert isinstance(failed, ProxyFailed) and failed.proxy_id is None
    for bad in ({"host": "bad host!"}, {"port": 0}, {"scheme": "ftp"}, {"proxy_id": "a.b"}):
        data = msgspec.json.decode(raw) | bad
        with pytest.raises(msgspec.ValidationError):
            decode_event(msgspec.json.encode(data))
