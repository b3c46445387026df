from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dispatch.state import Dispatch, DispatchState, Finish, Start
from schemas.events import (
    ConsentGiven,
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    JobCreated,
    JobStarted,
    TbEvent,
)
from schemas.values import ConsentCaps, JobSettings, Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class World:
    """Feeds events into a DispatchState the way the dispatcher loop does."""

    def __init__(self) -> None:
        self.state = DispatchState()
        self.seq = 0

    def add(self, event: TbEvent) -> None:
        self.seq += 1
        self.state.apply(Envelope(seq=self.seq, subject="", event=event))

    def consent(self, domain: str, caps: ConsentCaps = ConsentCaps()) -> None:
        self.add(
            ConsentGiven(
                id="c",
                at=NOW,
                actor="t",
                domain=domain,
                evidence="e",
                expires_at=NOW + timedelta(days=1),
                caps=caps,
            )
        )

    def job(
        self,
        job_id: str,
        flows: int,
        instance_count: int,
        url: str = "http://a.test/",
        max_attempts: int = 3,
    ) -> None:
        settings = JobSettings(instance_count=instance_count, max_attempts=max_attempts)
        self.add(
            JobCreated(
                id="j",
                at=NOW,
                actor="t",
                job_id=job_id,
                name=job_id,
                targets=[Target(url=url, flows=flows)],
                settings=settings,
            )
        )
        self.add(
            JobStarted(
                id="s",
                at=NOW,
                actor="t",
                job_id=job_id,
                flows_total=flows,
                allowed_hosts=["a.test"],
            )
        )

    def dispatch_all(self, at: datetime = NOW) -> list[Dispatch]:
        out = self.state.dispatches(at)
        for d in out:
            self.add(dispatched(d, at))
        return out


def dispatched(d: Dispatch, at: datetime = NOW) -> FlowDispatched:
    return FlowDispatched(
        id="d",
        at=at,
        actor="t",
        job_id=d.job_id,
        flow_id=d.flow_id,
        attempt=d.attempt,
        target_index=d.target_index,
        url="http://a.test/",
        clicks=0,
        session_seconds=0,
        allowed_hosts=[],
        seed=d.seed,
    )


def done(d: Dispatch) -> FlowDone:
    return FlowDone(
        id="x",
        at=NOW,
        actor="r",
        job_id=d.job_id,
        flow_id=d.flow_id,
        attempt=d.attempt,
        runner_id="r",
        target_index=d.target_index,
    )


def failed(d: Dispatch, retryable: bool = True) -> FlowFailed:
    return FlowFailed(
        id="x",
        at=NOW,
        actor="r",
        job_id=d.job_id,
        flow_id=d.flow_id,
        attempt=d.attempt,
        target_index=d.target_index,
        reason="boom",
        retryable=retryable,
    )


def test_created_job_is_asked_to_start() -> None:
    w = World()
    w.consent("a.test")
    w.add(
        JobCreated(
            id="j",
            at=NOW,
            actor="t",
            job_id="j1",
            name="n",
            targets=[Target(url="http://a.test/")],
            settings=JobSettings(),
        )
    )
    assert w.state.plan(NOW) == [Start("j1")]
    assert w.state.authorised_hosts(NOW) == {"a.test"}


def test_never_more_in_flight_than_instance_count() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=10, instance_count=3)
    first = w.dispatch_all()
    assert len(first) == 3
    assert w.dispatch_all() == []
    w.add(done(first[0]))
    assert len(w.dispatch_all()) == 1


def test_retryable_failure_is_redispatched_until_the_limit() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=1, instance_count=1, max_attempts=2)
    (d1,) = w.dispatch_all()
    w.add(failed(d1))
    (d2,) = w.dispatch_all()
    assert (d2.flow_id, d2.attempt) == (d1.flow_id, 2)
    w.add(failed(d2))
    assert w.state.plan(NOW) == [Finish("j1")]
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].failed) == (0, 1)


def test_duplicate_done_counts_once_and_job_finishes() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=2, instance_count=2)
    d = w.dispatch_all()
    for event in (done(d[0]), done(d[0]), done(d[1])):
        w.add(event)
    assert w.state.plan(NOW) == [Finish("j1")]
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].failed) == (2, 0)


def test_domain_concurrency_cap_holds_across_jobs() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=2))
    w.job("j1", flows=5, instance_count=5)
    w.job("j2", flows=5, instance_count=5)
    assert len(w.dispatch_all()) == 2


def test_domain_rate_cap_per_minute() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=100, max_flows_per_minute=3))
    w.job("j1", flows=10, instance_count=10)
    assert len(w.dispatch_all()) == 3


def test_jobs_share_dispatch_fairly() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=50, instance_count=50)
    w.job("j2", flows=50, instance_count=50)
    picked = [a for a in w.state.plan(NOW, max_dispatches=10) if isinstance(a, Dispatch)]
    assert sorted(p.job_id for p in picked).count("j1") == 5


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.sampled_from(["done", "fail", "fatal", "dup"]), st.integers(0, 30)),
        max_size=80,
    ),
    st.integers(1, 4),
)
def test_in_flight_never_exceeds_instance_count(steps: list[tuple[str, int]], cap: int) -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=6, instance_count=cap)
    live = w.dispatch_all()
    for kind, pick in steps:
        if not live:
            break
        d = live[pick % len(live)]
        if kind == "done":
            w.add(done(d))
        elif kind == "dup":
            w.add(done(d))
            w.add(done(d))
        else:
            w.add(failed(d, retryable=kind == "fail"))
        live.remove(d)
        live += w.dispatch_all()
        plan = w.state.jobs["j1"]
        assert 0 <= plan.in_flight <= cap
        assert plan.done + plan.failed <= 6
