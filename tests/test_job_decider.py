from __future__ import annotations

from contextlib import suppress
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from engine.errors import Rejected
from engine.jobs.decider import (
    TERMINAL,
    AbortJob,
    CancelJob,
    CreateJob,
    FinishJob,
    Job,
    JobCommand,
    JobStatus,
    Meta,
    PauseJob,
    ResumeJob,
    StartJob,
    decide,
    evolve,
    fold,
)
from schemas import subjects
from schemas.events import (
    JobCompleted,
    JobCreated,
    JobFailed,
    JobRefused,
    JobStarted,
    TbEvent,
    encode_event,
)
from schemas.stored import decode_stored
from schemas.values import JobSettings, Platform, Target

META = Meta(id="e", at=datetime(2026, 1, 1, tzinfo=UTC), actor="test")
TARGETS = (Target(url="http://a.test/", flows=3), Target(url="http://b.test/x", flows=2))


def create(job_id: str = "j") -> CreateJob:
    return CreateJob(job_id, "n", TARGETS, JobSettings(), Platform())


def run(cmds: list[JobCommand]) -> tuple[Job, list[TbEvent]]:
    job, log, seq = Job(), [], 0
    for cmd in cmds:
        with suppress(Rejected):
            for event in decide(job, cmd, META):
                seq += 1
                job = evolve(job, event, seq)
                log.append(event)
    return job, log


def test_created_job_starts_when_every_host_is_authorised() -> None:
    job, log = run([create(), StartJob("j", frozenset({"a.test", "b.test"}))])
    assert job.status == JobStatus.RUNNING
    assert isinstance(log[-1], JobStarted) and log[-1].flows_total == 5


def test_job_is_refused_naming_the_unauthorised_hosts() -> None:
    job, log = run([create(), StartJob("j", frozenset({"a.test"}))])
    assert job.status == JobStatus.REFUSED
    refused = log[-1]
    assert isinstance(refused, JobRefused) and refused.hosts == ["b.test"]
    assert "b.test" in refused.reason


def test_finish_with_no_success_fails_the_job() -> None:
    job, log = run([create(), StartJob("j", frozenset({"a.test", "b.test"})), FinishJob("j", 0, 5)])
    assert job.status == JobStatus.FAILED and isinstance(log[-1], JobFailed)


def test_finish_must_account_for_every_flow() -> None:
    job, _ = run([create(), StartJob("j", frozenset({"a.test", "b.test"}))])
    try:
        decide(job, FinishJob("j", 2, 1), META)
    except Rejected as err:
        assert err.field == "flows"
    else:
        raise AssertionError("a finish that loses flows must be rejected")


def test_abort_refuses_a_job_that_never_started_and_fails_one_that_did() -> None:
    _, log = run([AbortJob("j", "JobCreated could not be read")])  # its creation unreadable
    assert isinstance(log[-1], JobRefused) and "could not be read" in log[-1].reason
    job, log = run([create(), StartJob("j", frozenset({"a.test", "b.test"})),
                    AbortJob("j", "planning failed", 2, 1)])  # fmt: skip
    failed = log[-1]
    assert isinstance(failed, JobFailed) and job.status == JobStatus.FAILED
    assert (failed.reason, failed.flows_done, failed.flows_failed) == ("planning failed", 2, 1)


def test_cannot_cancel_a_completed_job() -> None:
    job, _ = run([create(), StartJob("j", frozenset({"a.test", "b.test"})), FinishJob("j", 5, 0)])
    try:
        decide(job, CancelJob("j"), META)
    except Rejected as err:
        assert "completed" in err.rule
    else:
        raise AssertionError


COMMANDS = st.one_of(
    st.just(create()),
    st.sampled_from([frozenset(), frozenset({"a.test"}), frozenset({"a.test", "b.test"})]).map(
        lambda hosts: StartJob("j", hosts)
    ),
    st.just(PauseJob("j")),
    st.sampled_from([frozenset(), frozenset({"a.test", "b.test"})]).map(
        lambda hosts: ResumeJob("j", hosts)
    ),
    st.just(CancelJob("j")),
    st.tuples(st.integers(-1, 6), st.integers(-1, 6)).map(lambda t: FinishJob("j", *t)),
    st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda t: AbortJob("j", "broken", *t)),
)


@given(st.lists(COMMANDS, max_size=12))
def test_no_transition_out_of_a_terminal_state(cmds: list[JobCommand]) -> None:
    job, seq = Job(), 0
    for cmd in cmds:
        before = job.status
        with suppress(Rejected):
            for event in decide(job, cmd, META):
                seq += 1
                job = evolve(job, event, seq)
        if before in TERMINAL:
            assert job.status == before


@given(st.lists(COMMANDS, max_size=12))
def test_finished_counts_never_exceed_the_planned_flows(cmds: list[JobCommand]) -> None:
    _, log = run(cmds)
    for event in log:
        if isinstance(event, (JobCompleted, JobFailed)):
            assert 0 <= event.flows_done + event.flows_failed <= 5
        if isinstance(event, JobCompleted) or (
            isinstance(event, JobFailed) and event.reason == "every flow failed"
        ):  # finished, not aborted: every flow accounted for
            assert event.flows_done + event.flows_failed == 5


def stored(event: TbEvent) -> TbEvent:
    """The event as a reader gets it back from the stream: JSON, checked for its subject."""
    headers = None
    if isinstance(event, JobCreated):  # JobCommands.create stores it as the job's first
        headers = {
            subjects.EXPECTED_LAST_SUBJECT_SEQ: "0",
            subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: subjects.job_stream_filter(event.job_id),
        }
    return decode_stored(subjects.subject_for(event), encode_event(event), headers)


@given(st.lists(COMMANDS, max_size=12))
def test_the_stored_history_replays_to_the_state_that_was_decided_on(
    cmds: list[JobCommand],
) -> None:
    """A later decision folds the log, not the decider's memory: everything evolve needs
    must survive encoding, decoding and the subject check."""
    job, log = run(cmds)
    assert fold([(seq, stored(e)) for seq, e in enumerate(log, start=1)]) == job


# what each accepted command leads to, written apart from the decider's tables
EXPECTED_STATUS = {
    CreateJob: lambda job, cmd: JobStatus.CREATED,
    StartJob: lambda job, cmd: (
        JobStatus.RUNNING if {"a.test", "b.test"} <= cmd.authorised_hosts else JobStatus.REFUSED
    ),
    PauseJob: lambda job, cmd: JobStatus.PAUSED,
    ResumeJob: lambda job, cmd: JobStatus.RUNNING,
    CancelJob: lambda job, cmd: JobStatus.CANCELLED,
    FinishJob: lambda job, cmd: JobStatus.FAILED if cmd.flows_done == 0 else JobStatus.COMPLETED,
    AbortJob: lambda job, cmd: (
        JobStatus.REFUSED if job.status in (JobStatus.NEW, JobStatus.CREATED) else JobStatus.FAILED
    ),
}


@given(st.lists(COMMANDS, max_size=12))
def test_each_accepted_command_leads_where_the_lifecycle_says(cmds: list[JobCommand]) -> None:
    job, seq = Job(), 0
    for cmd in cmds:
        try:
            events = decide(job, cmd, META)
        except Rejected:
            continue
        for event in events:
            seq += 1
            after = evolve(job, event, seq)
        assert after.status == EXPECTED_STATUS[type(cmd)](job, cmd), (job.status, cmd)
        job = after
