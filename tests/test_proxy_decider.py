"""The proxy health rule: repeated failures mark a proxy bad, a passing check restores it,
and a bad or retired proxy is never a candidate."""

from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import Conflict, NotFound, Rejected
from engine.proxies.decider import (
    CheckProxy,
    HealthPolicy,
    MarkBad,
    Meta,
    ProxyCommand,
    RecordCheck,
    RegisterProxy,
    RetireProxy,
    decide,
    due,
)
from engine.proxies.pool import candidates
from schemas.events import (
    ProxyCheckFailed,
    ProxyFailed,
    ProxyMarkedBad,
    ProxyRegistered,
    ProxyRestored,
    ProxyRetired,
    decode_event,
    encode_event,
)
from schemas.proxy_state import ProxyState, ProxyStatus, evolve_proxy
from schemas.values import ProxyPool

P = "proxy_1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = HealthPolicy(
    failures=3,
    window=timedelta(seconds=60),
    cooldown=timedelta(seconds=30),
    max_cooldown=timedelta(seconds=300),
)
REGISTER = RegisterProxy(P, "http", "127.0.0.1", 3128, True, "eu")


def meta(at: datetime) -> Meta:
    return Meta(id="e", at=at, actor="test")


def failure(at: datetime, n: int, proxy_id: str = P, flow: str = "job_1_0_0") -> ProxyFailed:
    return ProxyFailed(
        id="f",
        at=at,
        actor="runner-1",
        job_id="job_1",
        flow_id=flow,
        attempt=1,
        proxy=f"http://127.0.0.1:{3128}",
        reason="connection refused",
        n=n,
        proxy_id=proxy_id,
        error="unreachable",
    )


class Log:
    """A proxy's state as the log would fold it, with stream sequences."""

    def __init__(self) -> None:
        self.state = ProxyState()
        self.seq = 0
        self.events: list[object] = []

    def run(self, cmd: ProxyCommand, at: datetime) -> list[object]:
        out = decide(self.state, cmd, meta(at), POLICY)
        for event in out:
            self.fold(event)
        return list(out)

    def fold(self, event: object) -> None:
        self.seq += 1
        self.state = evolve_proxy(self.state, event, self.seq)  # type: ignore[arg-type]
        self.events.append(event)


def registered() -> Log:
    log = Log()
    log.run(REGISTER, T0)
    return log


def test_registration_records_where_not_who() -> None:
    log = registered()
    [event] = log.events
    assert isinstance(event, ProxyRegistered) and event.has_credentials
    assert decode_event(encode_event(event)) == event
    assert (log.state.status, log.state.label, log.state.version) == (ProxyStatus.OK, "eu", 1)
    with pytest.raises(Conflict):
        log.run(REGISTER, T0)


def test_failures_within_the_window_mark_the_proxy_bad() -> None:
    log = registered()
    for n in range(2):
        log.fold(failure(T0 + timedelta(seconds=n), n))
    assert due(log.state, T0 + timedelta(seconds=2), POLICY) is None
    assert log.run(MarkBad(P), T0 + timedelta(seconds=2)) == []
    log.fold(failure(T0 + timedelta(seconds=2), 2))
    now = T0 + timedelta(seconds=3)
    assert due(log.state, now, POLICY) == MarkBad(P)
    [bad] = log.run(MarkBad(P), now)
    assert isinstance(bad, ProxyMarkedBad)
    assert (bad.failures, bad.bad_until) == (3, now + POLICY.cooldown)
    assert "unreachable" in bad.reason
    assert log.state.status == ProxyStatus.BAD and not log.state.usable


def test_old_failures_and_repeats_do_not_count() -> None:
    log = registered()
    log.fold(failure(T0, 0))
    log.fold(failure(T0, 0))  # the same report stored twice
    log.fold(failure(T0 + timedelta(seconds=61), 1))
    log.fold(failure(T0 + timedelta(seconds=62), 2))
    assert len(log.state.failures) == 3
    assert due(log.state, T0 + timedelta(seconds=62), POLICY) is None


def test_failures_from_a_runner_whose_clock_is_ahead_count() -> None:
    log = registered()
    for n in range(3):
        log.fold(failure(T0 + timedelta(seconds=90 + n), n))
    assert due(log.state, T0, POLICY) == MarkBad(P)


def test_failures_of_another_proxy_change_nothing() -> None:
    log = registered()
    for n in range(5):
        log.fold(failure(T0, n, proxy_id="proxy_2"))
    assert log.state.failures == ()


def bad_proxy() -> tuple[Log, datetime]:
    log = registered()
    for n in range(3):
        log.fold(failure(T0, n))
    log.run(MarkBad(P), T0)
    return log, T0 + POLICY.cooldown


def test_a_passing_check_after_the_cool_down_restores_it() -> None:
    log, until = bad_proxy()
    assert due(log.state, until - timedelta(seconds=1), POLICY) is None
    assert due(log.state, until, POLICY) == CheckProxy(P)
    assert log.run(RecordCheck(P, None), until - timedelta(seconds=1)) == []  # too early
    [restored] = log.run(RecordCheck(P, None, "tunnel"), until)
    assert isinstance(restored, ProxyRestored)
    assert (log.state.status, log.state.restored_at, log.state.failures) == (
        ProxyStatus.OK,
        until,
        (),
    )


def test_a_failing_check_extends_the_cool_down_doubling_up_to_the_maximum() -> None:
    log, at = bad_proxy()
    waits = []
    for _ in range(5):
        [checked] = log.run(RecordCheck(P, "refused: 502"), at)
        assert isinstance(checked, ProxyCheckFailed)
        waits.append((checked.bad_until - at).total_seconds())
        at = checked.bad_until
    assert waits == [60, 120, 240, 300, 300]
    assert log.state.status == ProxyStatus.BAD


def test_failures_reported_while_bad_say_nothing_new() -> None:
    log, until = bad_proxy()
    for n in range(3, 10):
        log.fold(failure(T0 + timedelta(seconds=1), n))
    assert log.state.failures == ()
    log.run(RecordCheck(P, None), until)
    assert due(log.state, until, POLICY) is None  # restored with a clean slate


def test_retire() -> None:
    log = registered()
    [retired] = log.run(RetireProxy(P, "gone"), T0)
    assert isinstance(retired, ProxyRetired) and log.state.status == ProxyStatus.RETIRED
    with pytest.raises(Conflict):
        log.run(RetireProxy(P), T0)
    with pytest.raises(NotFound):
        decide(ProxyState(), RetireProxy(P), meta(T0))
    for n in range(5):
        log.fold(failure(T0, n))
    assert due(log.state, T0, POLICY) is None


def test_the_pool_orders_and_rotates_usable_proxies_only() -> None:
    states = {
        f"p{i}": ProxyState(
            proxy_id=f"p{i}", status=ProxyStatus.OK, registered_seq=10 - i, label=lb
        )
        for i, lb in ((1, "eu"), (2, "us"), (3, "eu"))
    }
    states["p4"] = ProxyState(proxy_id="p4", status=ProxyStatus.BAD, registered_seq=1)
    everyone = ProxyPool()
    assert candidates(None, states, True, 0) == []
    assert candidates(everyone, states, False, 5) == ["p3", "p2", "p1"]  # registration order
    assert [candidates(everyone, states, True, t)[0] for t in range(4)] == ["p3", "p2", "p1", "p3"]
    assert candidates(ProxyPool(label="eu"), states, False, 0) == ["p3", "p1"]
    assert candidates(ProxyPool(ids=["p4", "p1", "gone"]), states, False, 0) == ["p1"]
    assert candidates(ProxyPool(ids=["p4"]), states, True, 3) == []


# -- properties -------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(["fail", "mark", "check_ok", "check_bad", "retire"]),
        st.integers(min_value=0, max_value=120),  # seconds since the previous step
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_health_properties(plan: list[tuple[str, int]]) -> None:
    """Whatever happens: a bad proxy is never a candidate; it is marked bad only on enough
    recent failures; restored only by a check after its cool-down; retired stays retired."""
    log = registered()
    at = T0
    for n, (step, wait) in enumerate(plan):
        at += timedelta(seconds=wait)
        before = log.state
        out: list[object] = []
        with suppress(Rejected):
            if step == "fail":
                log.fold(failure(at, n))
            elif step == "mark":
                out = log.run(MarkBad(P), at)
            elif step in ("check_ok", "check_bad"):
                out = log.run(RecordCheck(P, None if step == "check_ok" else "refused"), at)
            else:
                out = log.run(RetireProxy(P), at)
        state = log.state
        usable = candidates(ProxyPool(), {P: state}, True, n)
        assert (usable == [P]) == (state.status == ProxyStatus.OK)
        if before.status == ProxyStatus.RETIRED:
            assert state.status == ProxyStatus.RETIRED
        for event in out:
            if isinstance(event, ProxyMarkedBad):
                recent = [f for f in before.failures if f.at > at - POLICY.window]
                assert before.status == ProxyStatus.OK and len(recent) >= POLICY.failures
            if isinstance(event, ProxyRestored):
                assert before.status == ProxyStatus.BAD
                assert before.bad_until is not None and at >= before.bad_until
            if isinstance(event, ProxyCheckFailed):
                assert event.bad_until - at <= POLICY.max_cooldown
        if state.status == ProxyStatus.BAD:
            assert state.bad_until is not None and state.failures == ()


@settings(max_examples=100, deadline=None)
@given(steps)
def test_folding_twice_changes_nothing(plan: list[tuple[str, int]]) -> None:
    """The dispatcher applies its reads and the stream again: folding is idempotent."""
    log = registered()
    at = T0
    for n, (step, wait) in enumerate(plan):
        at += timedelta(seconds=wait)
        with suppress(Rejected):
            if step == "fail":
                log.fold(failure(at, n))
            elif step == "mark":
                log.run(MarkBad(P), at)
            elif step == "check_ok":
                log.run(RecordCheck(P, None), at)
    again = log.state
    for seq, event in enumerate(log.events, start=1):
        again = evolve_proxy(again, event, seq)  # type: ignore[arg-type]
    assert again == log.state
