from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import event as note
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dispatch import snapshot
from engine.dispatch.state import (
    Abort,
    Dispatch,
    DispatchState,
    FailRevoked,
    Finish,
    FlowStatus,
    PauseRevoked,
    Stall,
    Start,
)
from projections.read_model import apply_batch, open_read_model
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    ConsentRevoked,
    Envelope,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    FlowStarted,
    JobCompleted,
    JobCreated,
    JobPaused,
    JobResumed,
    JobStarted,
    TbEvent,
)
from schemas.flow_lifecycle import FlowProgress, FlowState, flow_transition
from schemas.values import ConsentCaps, JobSettings, Target

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONSUMER = subjects.dispatch_consumer("linux", "chromium")


class World:
    """Feeds events into a DispatchState the way the dispatcher loop does."""

    def __init__(self) -> None:
        self.state = DispatchState()
        self.seq = 0
        self.log: list[Envelope] = []  # everything added, as it would be stored

    def add(self, event: TbEvent) -> None:
        self.seq += 1
        env = Envelope(seq=self.seq, subject=subjects.subject_for(event), event=event)
        self.log.append(env)
        self.state.apply(env)

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
        session_seconds: float = 5.0,
    ) -> None:
        settings = JobSettings(
            instance_count=instance_count,
            max_attempts=max_attempts,
            session_seconds=session_seconds,
        )
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

    def dispatch_all(self, at: datetime = NOW, *, delivered: bool = True) -> list[Dispatch]:
        """Plan and store the dispatches due at ``at``; a runner takes them at once unless
        not ``delivered`` (they wait in the queue)."""
        out = self.state.dispatches(at)
        for d in out:
            self.add(dispatched(d, at))
        if delivered:
            self.deliver(self.seq, at)
        return out

    def deliver(self, up_to: int, at: datetime) -> None:
        """The platform's consumer is seen to have delivered up to ``up_to``."""
        self.state.delivered(CONSUMER, up_to, at)


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


def stalled(d: Dispatch, waited: float = 1.0) -> FlowStalled:
    return FlowStalled(
        id="x", at=NOW, actor="system", job_id=d.job_id, flow_id=d.flow_id,
        attempt=d.attempt, target_index=d.target_index, waited_seconds=waited,
    )  # fmt: skip


def released(d: Dispatch) -> FlowReleased:
    return FlowReleased(
        id="x", at=NOW, actor="r", job_id=d.job_id, flow_id=d.flow_id, attempt=d.attempt,
        target_index=d.target_index, runner_id="r", reason="paused",
    )  # fmt: skip


# -- stalls -------------------------------------------------------------------------

MARGIN = timedelta(minutes=10)


def test_a_stuck_attempt_is_stalled_after_its_session_and_the_margin_not_before() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=1, instance_count=1, session_seconds=30, max_attempts=2)
    (d1,) = w.dispatch_all()
    deadline = NOW + timedelta(seconds=30) + MARGIN
    assert w.state.due(deadline - timedelta(seconds=1), MARGIN) == []
    assert w.state.due(deadline, MARGIN) == [Stall("j1", d1.flow_id, 1)]
    w.add(stalled(d1))  # a spent attempt: dispatched again
    (d2,) = w.dispatch_all(at=deadline)
    assert (d2.flow_id, d2.attempt) == (d1.flow_id, 2)
    assert w.state.due(deadline + timedelta(seconds=30) + MARGIN, MARGIN) == [
        Stall("j1", d1.flow_id, 2)
    ]
    w.add(stalled(d2))  # attempts spent: the flow failed, the job can finish
    assert w.state.due(deadline, MARGIN) == [Finish("j1")]
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].failed) == (0, 1)


def test_an_hour_long_session_is_not_cut_while_a_stuck_short_one_is() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=10))
    w.job("long", flows=1, instance_count=1, session_seconds=3600)
    w.job("short", flows=1, instance_count=1, session_seconds=5)
    w.dispatch_all()
    later = NOW + timedelta(minutes=30)
    assert w.state.due(later, MARGIN) == [Stall("short", "short_0_0", 1)]
    assert w.state.due(NOW + timedelta(seconds=3600) + MARGIN, MARGIN) == [
        Stall("long", "long_0_0", 1),
        Stall("short", "short_0_0", 1),
    ]


def test_work_waiting_undelivered_in_the_queue_is_not_stalled_its_clock_starts_at_delivery() -> (
    None
):
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=10))
    w.job("j1", flows=3, instance_count=3, session_seconds=5)
    d1, d2, _ = w.dispatch_all(delivered=False)
    assert w.state.awaiting_delivery() == {CONSUMER}
    first = w.seq - 2  # the stream sequence of d1's work item
    w.deliver(first, NOW)  # one slot in the fleet: d1 runs, d2 and d3 wait
    later = NOW + timedelta(seconds=5) + MARGIN
    assert w.state.due(later, MARGIN) == [Stall("j1", d1.flow_id, 1)]
    w.add(done(d1))
    w.deliver(first + 1, later)  # d2 is handed to the runner only now
    assert w.state.due(later + timedelta(seconds=5) + MARGIN - timedelta(seconds=1), MARGIN) == []
    assert w.state.due(later + timedelta(seconds=5) + MARGIN, MARGIN) == [
        Stall("j1", d2.flow_id, 1)
    ]
    assert w.state.awaiting_delivery() == {CONSUMER}  # d3 still waits, never stalled
    restored = snapshot.decode(snapshot.encode(w.state))  # what was seen survives a restart
    assert restored is not None
    much_later = later + timedelta(hours=2)
    assert restored.due(much_later, MARGIN) == w.state.due(much_later, MARGIN)
    assert w.state.due(much_later, MARGIN) == [Stall("j1", d2.flow_id, 1)]


def test_a_stall_planned_once_waits_for_the_reader_and_a_runner_outcome_before_it_stands() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=1, instance_count=1, session_seconds=5)
    (d1,) = w.dispatch_all()
    later = NOW + timedelta(hours=1)
    assert w.state.due(later, MARGIN) == [Stall("j1", d1.flow_id, 1)]
    w.state.ending.add((d1.flow_id, 1))  # appended, not yet read back
    assert w.state.due(later, MARGIN) == []
    w.add(done(d1))  # the runner's end was stored first: it stands
    w.add(stalled(d1))
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].failed) == (1, 0)
    assert w.state.ending == set()


def test_the_dispatch_time_survives_a_snapshot() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=3, instance_count=3, session_seconds=5)
    w.dispatch_all(at=NOW)
    restored = snapshot.decode(snapshot.encode(w.state))
    assert restored is not None
    later = NOW + timedelta(seconds=5) + MARGIN
    assert restored.due(later, MARGIN) == w.state.due(later, MARGIN) != []


# -- releases, pauses, revocation ---------------------------------------------------


def test_a_released_work_item_is_dispatched_again_without_spending_an_attempt() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=1, instance_count=1, max_attempts=1)
    (d1,) = w.dispatch_all()
    w.add(released(d1))
    assert w.state.jobs["j1"].flows[d1.flow_id].status == FlowStatus.PLANNED
    (d2,) = w.dispatch_all()
    assert d2.attempt == 2  # a new work item, yet the only try is still to come
    w.add(failed(d2))  # retryable, but max_attempts=1: this was the one try
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].failed) == (0, 1)


def test_a_paused_job_dispatches_nothing_and_resumes_where_it_was() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=4, instance_count=2)
    first = w.dispatch_all()
    w.add(JobPaused(id="p", at=NOW, actor="u", job_id="j1", reason="user"))
    w.add(done(first[0]))  # in-flight flows finish while paused
    assert w.dispatch_all() == []
    w.add(JobResumed(id="r", at=NOW, actor="u", job_id="j1"))
    assert len(w.dispatch_all()) == 1
    assert (w.state.jobs["j1"].done, w.state.jobs["j1"].in_flight) == (1, 2)


def revoke(w: World, domain: str) -> None:
    w.add(ConsentRevoked(id="v", at=NOW, actor="owner", domain=domain, reason="gone"))


def test_revocation_ends_in_flight_flows_on_the_host_and_pauses_its_running_jobs() -> None:
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=10))
    w.consent("b.test", ConsentCaps(max_concurrent=10))
    w.job("ja", flows=4, instance_count=2)
    w.job("jb", flows=4, instance_count=2, url="http://b.test/")
    w.dispatch_all()
    revoke(w, "a.test")
    due = w.state.due(NOW, MARGIN)
    assert due == [FailRevoked("ja", "ja_0_0", 1), FailRevoked("ja", "ja_0_1", 1),
                   PauseRevoked("ja", "a.test")]  # fmt: skip
    assert all(d.job_id == "jb" for d in w.state.dispatches(NOW))  # nothing more to a.test
    assert w.state.authorised_hosts(NOW) == {"b.test"}


def test_a_job_on_a_revoked_host_that_was_paused_is_not_paused_again() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=2, instance_count=1)
    w.dispatch_all()
    revoke(w, "a.test")
    w.add(JobPaused(id="p", at=NOW, actor="system", job_id="j1", reason="consent revoked"))
    assert w.state.due(NOW, MARGIN) == [FailRevoked("j1", "j1_0_0", 1)]


# -- lanes: one job's fault stays with that job --------------------------------------


def test_an_exception_planning_one_job_breaks_that_job_only(monkeypatch: object) -> None:
    import engine.dispatch.state as state_module

    real_seed = state_module.flow_seed

    def seed(job: object, flow: str) -> int:
        if flow.startswith("bad"):
            raise RuntimeError("injected")
        return real_seed(job, flow)  # type: ignore[arg-type]

    monkeypatch.setattr(state_module, "flow_seed", seed)  # type: ignore[attr-defined]
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=10))
    w.job("bad", flows=2, instance_count=2)
    w.job("good", flows=2, instance_count=2)
    assert {d.job_id for d in w.dispatch_all()} == {"good"}
    assert "injected" in w.state.jobs["bad"].broken
    assert [e.job_id for e in w.state.errors] == ["bad"]
    assert w.state.due(NOW, MARGIN) == [Abort("bad")]


def created(job_id: str) -> JobCreated:
    return JobCreated(
        id="j", at=NOW, actor="t", job_id=job_id, name=job_id,
        targets=[Target(url="http://a.test/", flows=2)], settings=JobSettings(),
    )  # fmt: skip


def test_an_exception_applying_an_event_breaks_that_job_only() -> None:
    w = World()
    w.consent("a.test")
    w.add(created("j1"))
    w.add(created("j2"))
    w.state.jobs["j1"].hosts = ()  # a state this code never builds: planning flows fails
    for job_id in ("j1", "j2"):
        w.add(JobStarted(id="s", at=NOW, actor="t", job_id=job_id, flows_total=2,
                         allowed_hosts=["a.test"]))  # fmt: skip
    assert "JobStarted" in w.state.jobs["j1"].broken
    assert w.state.jobs["j1"].job.version == 4  # the next append expects the log's end
    assert [e.job_id for e in w.state.errors] == ["j1"]
    assert w.state.due(NOW, MARGIN) == [Abort("j1")]
    assert {d.job_id for d in w.dispatch_all()} == {"j2"}


def test_an_unreadable_first_job_created_makes_a_job_to_refuse() -> None:
    w = World()
    w.state.unreadable("forged", 7, "JobCreated", "url is not a valid URL", first=True)
    assert w.state.due(NOW, MARGIN) == [Abort("forged")]
    assert w.state.jobs["forged"].job.version == 7
    assert "url is not a valid URL" in w.state.jobs["forged"].broken
    w.state.unreadable("other", 8, "JobCreated", "bad", first=False)  # a job that exists
    assert "other" not in w.state.jobs


def test_an_unreadable_message_on_a_live_job_moves_its_version_only() -> None:
    w = World()
    w.consent("a.test")
    w.job("j1", flows=1, instance_count=1)
    before = w.state.jobs["j1"]
    w.state.unreadable("j1", 99, "JobCancelled", "not JSON", first=False)
    assert before.job.version == 99 and not before.broken


# -- one flow rule: the dispatcher's counts are the read model's ----------------------

FLOW_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["started", "done", "fail", "fatal", "stall", "release", "dup"]),
        st.integers(0, 30),
        st.booleans(),  # about an attempt in flight now, or any attempt ever sent
    ),
    max_size=60,
)


def lifecycle_counts(events: list[TbEvent], max_attempts: int) -> tuple[int, int]:
    """The read model's rule, folded straight over every flow event (FlowStarted too)."""
    flows: dict[str, FlowState | None] = {}
    done = failed = 0
    job_open = True
    for e in events:
        if isinstance(e, JobCompleted):
            job_open = False
        elif isinstance(e, FlowProgress):
            step = flow_transition(
                flows.get(e.flow_id), e, max_attempts=max_attempts, job_open=job_open
            )
            flows[e.flow_id] = step.state
            done, failed = done + step.done, failed + step.failed
    return done, failed


@dataclass
class FlowStory:
    world: World
    reports: list[TbEvent]  # the flow events and JobCompleted, in log order
    completed: JobCompleted | None


def flow_story(steps: list[tuple[str, int, bool]], flows: int, max_attempts: int) -> FlowStory:
    """Runners report any attempt, late, twice or out of order; the dispatcher dispatches
    and finishes as soon as it can; reports go on after the job completed. Before it
    completed, the dispatcher's counts are checked against the flow rule at every step."""
    w = World()
    w.consent("a.test", ConsentCaps(max_concurrent=10))
    w.job("j1", flows=flows, instance_count=flows, max_attempts=max_attempts)
    story = FlowStory(w, [], None)
    sent: list[Dispatch] = []  # every attempt ever dispatched, old ones too

    def add(event: TbEvent) -> None:
        story.reports.append(event)
        w.add(event)

    def dispatcher_turn() -> None:
        for d in w.state.dispatches(NOW):
            sent.append(d)
            add(dispatched(d))
        if story.completed is None and Finish("j1") in w.state.due(NOW, MARGIN):
            plan = w.state.jobs["j1"]
            story.completed = JobCompleted(
                id="c", at=NOW, actor="system", job_id="j1",
                flows_done=plan.done, flows_failed=plan.failed,
            )  # fmt: skip
            add(story.completed)

    dispatcher_turn()
    for kind, pick, current in steps:
        if kind == "dup":
            flow_events = [e for e in story.reports if isinstance(e, FlowProgress)]
            add(flow_events[pick % len(flow_events)])  # stored again: a new sequence
        else:
            plan = w.state.jobs.get("j1")
            flying = [d for d in sent if plan and d.flow_id in plan.flying
                      and plan.flows[d.flow_id].attempt == d.attempt]  # fmt: skip
            choices = flying if current and flying else sent
            d = choices[pick % len(choices)]
            started = FlowStarted(
                id="x", at=NOW, actor="r", job_id="j1", flow_id=d.flow_id,
                attempt=d.attempt, runner_id="r",
            )  # fmt: skip
            report = {
                "started": started,
                "done": done(d),
                "fail": failed(d),
                "fatal": failed(d, retryable=False),
                "stall": stalled(d),
                "release": released(d),
            }[kind]
            add(report)
        if story.completed is None:
            plan = w.state.jobs["j1"]
            assert (plan.done, plan.failed) == lifecycle_counts(story.reports, max_attempts)
        dispatcher_turn()
    return story


@settings(max_examples=300, deadline=None)
@given(FLOW_STEPS, st.integers(1, 3), st.integers(1, 3))
def test_dispatcher_read_model_and_job_completed_count_alike(
    steps: list[tuple[str, int, bool]], flows: int, max_attempts: int
) -> None:
    story = flow_story(steps, flows, max_attempts)
    completed = story.completed
    note("job completed" if completed is not None else "job open")
    if completed is not None:
        assert "j1" not in story.world.state.jobs
        counts = (completed.flows_done, completed.flows_failed)
        assert counts == lifecycle_counts(story.reports, max_attempts)
        assert sum(counts) == flows


async def read_model_counts(log: list[Envelope]) -> tuple[int, int]:
    """The job's counts in a real SQLite read model, folded by the projector's batch fold."""
    with tempfile.TemporaryDirectory() as tmp:
        db = await open_read_model(Path(tmp) / "read.db")
        try:
            for n in range(0, len(log), 7):  # in batches, as the projector reads them
                await apply_batch(db, log[n : n + 7])
            [(done_, failed_)] = await db.execute_fetchall(
                "SELECT flows_done, flows_failed FROM jobs WHERE job_id = 'j1'"
            )
        finally:
            await db.close()
    return done_, failed_


@settings(max_examples=60, deadline=None)
@given(FLOW_STEPS, st.integers(1, 3), st.integers(1, 3))
def test_the_read_model_counts_what_the_dispatcher_counted(
    steps: list[tuple[str, int, bool]], flows: int, max_attempts: int
) -> None:
    story = flow_story(steps, flows, max_attempts)
    in_read_model = asyncio.run(read_model_counts(story.world.log))
    if story.completed is not None:
        assert in_read_model == (story.completed.flows_done, story.completed.flows_failed)
    else:
        plan = story.world.state.jobs["j1"]
        assert in_read_model == (plan.done, plan.failed)
