"""The engine checks a job against its creator's plan when it starts it, whoever stored
the JobCreated: a job published straight to NATS cannot get round the plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.runner import Runner
from engine.bus import Bus, Expect
from engine.dispatch import snapshot
from engine.dispatch.state import DispatchState, Start
from engine.jobs.decider import CreateJob, Job, Meta, StartJob, decide, evolve
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    Envelope,
    FlowDispatched,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobPaused,
    JobRefused,
    JobStarted,
    LicenseAssigned,
    TbEvent,
)
from schemas.ids import new_id, utcnow
from schemas.licences import PLANS
from schemas.values import JobSettings, JobStatus, Platform, Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, dispatches, embedded, log_until, start_outcomes

AT = datetime(2026, 1, 1, tzinfo=UTC)
HOST = "127.0.0.1"
URL = f"http://{HOST}:9/"
META = Meta(id="e1", at=AT, actor="ann")


def job_created(job_id: str, actor: str, **settings: object) -> JobCreated:
    return JobCreated(
        id=new_id(),
        at=utcnow(),
        actor=actor,
        job_id=job_id,
        name="direct",
        targets=[Target(url=URL, flows=2)],
        settings=JobSettings(**settings),  # type: ignore[arg-type]
    )


def licence(user_id: str, plan: str) -> LicenseAssigned:
    return LicenseAssigned(id=new_id(), at=utcnow(), actor="admin", user_id=user_id, plan=plan)


# -- the decider and the dispatcher's state ------------------------------------------------


def created_job(**settings: object) -> Job:
    settled = JobSettings(**settings)  # type: ignore[arg-type]
    cmd = CreateJob("j", "j", (Target(url=URL),), settled, Platform())
    [event] = decide(Job(), cmd, META)
    return evolve(Job(), event, 1)


def test_the_job_keeps_its_creator() -> None:
    assert created_job().creator == "ann"


def test_start_refuses_what_the_plan_lacks_before_looking_at_consent() -> None:
    job = created_job(human_surfing=True)
    [refused] = decide(job, StartJob("j", frozenset(), plan=PLANS["trial"]), META)
    assert isinstance(refused, JobRefused)
    assert refused.reason == "licence: plan 'trial' does not include human_surfing"
    [busy] = decide(
        created_job(human_surfing=False),
        StartJob("j", frozenset({HOST}), plan=PLANS["trial"], running_jobs=1),
        META,
    )
    assert isinstance(busy, JobRefused) and "concurrent_jobs 2" in busy.reason
    [ok] = decide(job, StartJob("j", frozenset({HOST}), plan=PLANS["enterprise"]), META)
    assert isinstance(ok, JobStarted)


def fed(*events: TbEvent) -> DispatchState:
    state = DispatchState()
    for seq, event in enumerate(events, start=1):
        state.apply(Envelope(seq, subjects.subject_for(event), event))
    return state


def test_the_state_knows_each_users_plan_and_running_jobs_and_a_snapshot_keeps_them() -> None:
    external = JobCreated(
        id="x", at=AT, actor="ann", job_id="ext", name="x", targets=[], settings=JobSettings(),
        kind="external",
    )  # fmt: skip
    started = JobStarted(
        id="s", at=AT, actor="system", job_id="j1", flows_total=2, allowed_hosts=[HOST]
    )
    state = fed(
        licence("ann", "trial"),
        licence("ann", "standard"),
        job_created("j1", "ann"),
        job_created("j2", "ann"),
        started,
        external,
    )
    assert state.plan_of("ann") == PLANS["standard"]
    assert state.plan_of("bob") == PLANS["enterprise"]  # none assigned: the default
    assert state.running_jobs("ann") == 2  # j1 and the external one; j2 not started
    assert Start("j2") in state.due(AT)
    restored = snapshot.decode(snapshot.encode(state))
    assert restored is not None
    assert (restored.plans, restored.external_jobs) == ({"ann": "standard"}, {"ext": "ann"})
    assert restored.jobs["j2"].job.creator == "ann" and restored.running_jobs("ann") == 2
    ended = JobCompleted(id="c", at=AT, actor="w", job_id="ext", flows_done=0, flows_failed=0)
    restored.apply(Envelope(99, "tb.job.ext.JobCompleted", ended))
    assert restored.running_jobs("ann") == 1


Step = tuple[str, str, object]
users = st.sampled_from(["ann", "ann", "bob"])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("create"), users, st.booleans()),  # human surfing or not
        st.tuples(st.just("external"), users, st.none()),
        st.tuples(st.just("assign"), users, st.sampled_from(["trial", *PLANS])),
        st.tuples(st.just("cancel"), st.just(""), st.integers(0, 30)),
        st.tuples(st.just("pause"), st.just(""), st.integers(0, 30)),
        st.tuples(st.just("tick"), st.just(""), st.none()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_engine_never_lets_a_user_run_more_jobs_or_features_than_their_plan_then(
    script: list[Step],
) -> None:
    consent = ConsentGiven(
        id="c", at=AT, actor="t", domain=HOST, evidence="e", expires_at=AT + timedelta(days=1)
    )
    state, seq, jobs = DispatchState(), 0, []
    running: dict[str, set[str]] = {"ann": set(), "bob": set()}  # counted here, not by state
    creators: dict[str, str] = {}

    def add(event: TbEvent) -> None:
        nonlocal seq
        seq += 1
        state.apply(Envelope(seq, subjects.subject_for(event), event))

    add(consent)
    for kind, user, arg in script:
        if kind == "create":
            jobs.append(f"j{len(jobs)}")
            creators[jobs[-1]] = user
            add(job_created(jobs[-1], user, human_surfing=arg))
        elif kind == "external":  # the API checks these; the engine only counts them
            jobs.append(f"x{len(jobs)}")
            creators[jobs[-1]] = user
            running[user].add(jobs[-1])
            add(JobCreated(
                id="x", at=AT, actor=user, job_id=jobs[-1], name="x", targets=[],
                settings=JobSettings(), kind="external",
            ))  # fmt: skip
        elif kind == "assign":
            add(licence(user, str(arg)))
        elif kind in ("cancel", "pause") and jobs:
            job_id = jobs[int(str(arg)) % len(jobs)]
            if job_id in running[creators[job_id]]:
                if kind == "cancel":
                    running[creators[job_id]].discard(job_id)
                    add(JobCancelled(id="e", at=AT, actor="t", job_id=job_id))
                elif job_id in state.jobs and state.jobs[job_id].job.status == JobStatus.RUNNING:
                    add(JobPaused(id="e", at=AT, actor="t", job_id=job_id))
        elif kind == "tick":
            for action in state.due(AT):
                plan = state.jobs[action.job_id]
                if not isinstance(action, Start):
                    continue
                cmd = state.start_command(plan, AT)
                [event] = decide(plan.job, cmd, Meta(id="s", at=AT, actor="system"))
                add(event)
                creator = plan.job.creator
                if isinstance(event, JobStarted):
                    running[creator].add(action.job_id)
                    most = cmd.plan.limits.concurrent_jobs
                    assert most is None or len(running[creator]) <= most
                    assert not plan.job.settings.human_surfing or cmd.plan.grants("human_surfing")
                else:
                    assert isinstance(event, JobRefused) and event.reason.startswith("licence: ")


# -- through a real nats-server ----------------------------------------------------------


async def append_directly(bus: Bus, event: JobCreated) -> int:
    """A JobCreated as the API stores it (the job's concurrency check, a command msg-id),
    but from a connection of its own: no API check on the way."""
    ack = await bus.append(
        event,
        msg_id=subjects.command_msg_id(new_id()),
        expect=Expect(subjects.job_stream_filter(event.job_id), 0),
    )
    return ack.seq


async def test_a_job_published_straight_to_nats_is_refused_on_its_creators_plan(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise(HOST)
        tb.run(Runner(bus, SteadyExecutor(0.0), slots=2).run(), "runner")
        await bus.append(licence("ann", "trial"), msg_id=new_id())
        await bus.append(licence("eve", "enterprise"), msg_id=new_id())
        await append_directly(bus, job_created("job_trial", "ann", human_surfing=True))
        await append_directly(bus, job_created("job_ent", "eve", human_surfing=True))
        trial = await log_until(
            bus,
            subjects.job_stream_filter("job_trial"),
            lambda e: isinstance(e.event, JobRefused),
            timeout=20,
        )
        ent = await log_until(
            bus,
            subjects.job_stream_filter("job_ent"),
            lambda e: isinstance(e.event, JobCompleted),
            timeout=30,
        )
        view = await tb.wait_job("job_trial", lambda v: v.status == JobStatus.REFUSED, 10)
        items = await dispatches(bus, "job_trial")
    refused = trial[-1].event
    assert isinstance(refused, JobRefused)
    assert refused.reason == "licence: plan 'trial' does not include human_surfing"
    assert view.reason == refused.reason  # what the API shows
    assert not items  # no flow of it was ever dispatched
    assert not any(isinstance(e.event, JobStarted) for e in trial)
    done = ent[-1].event
    assert isinstance(done, JobCompleted) and done.flows_done == 2


async def test_a_trial_user_runs_one_job_at_a_time_however_the_jobs_arrive(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise(HOST)  # no runner: a started job stays running
        await bus.append(licence("ann", "trial"), msg_id=new_id())
        ids = [f"job_{n}" for n in range(3)]
        for job_id in ids:
            await append_directly(bus, job_created(job_id, "ann", human_surfing=False))
        ends = await start_outcomes(bus, ids)
        items = await bus.load(subjects.ALL_DISPATCH)
    started = [e for e in ends if isinstance(e, JobStarted)]
    refused = [e for e in ends if isinstance(e, JobRefused)]
    assert len(started) == 1 and len(refused) == 2
    assert all(
        "concurrent_jobs 2 exceeds the limit of 1 of plan 'trial'" in e.reason for e in refused
    )
    assert {e.event.job_id for e in items if isinstance(e.event, FlowDispatched)} == {
        started[0].job_id
    }
