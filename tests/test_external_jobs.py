"""External jobs in the job decider, and what a log line means: pure, no I/O."""

from __future__ import annotations

from contextlib import suppress

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.dispatch.state import DispatchState
from engine.errors import Conflict, Rejected
from engine.jobs.decider import (
    TERMINAL,
    CancelJob,
    CreateJob,
    EndExternalJob,
    FinishJob,
    Job,
    JobCommand,
    JobStatus,
    PauseJob,
    ReportProgress,
    StartJob,
    decide,
    evolve,
)
from schemas import subjects
from schemas.events import (
    Envelope,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobProgressed,
    JobStarted,
    TbEvent,
    decode_event,
    encode_event,
)
from schemas.logs import (
    LogLine,
    decode_log_line,
    encode_log_line,
    level_of,
    log_line,
    progress_of,
    summary_of,
)
from schemas.stored import decode_stored
from schemas.values import JobSettings, Platform, Target
from tests.test_job_decider import META


def external(job_id: str = "j") -> CreateJob:
    return CreateJob(job_id, "crawl", (), JobSettings(), Platform(), kind="external")


def run(cmds: list[JobCommand], job: Job | None = None) -> tuple[Job, list[TbEvent]]:
    job, log, seq = job or Job(), [], 0
    for cmd in cmds:
        with suppress(Rejected):
            for event in decide(job, cmd, META):
                seq += 1
                job = evolve(job, event, seq)
                log.append(event)
    return job, log


# -- the decider ------------------------------------------------------------------------


def test_an_external_job_is_created_and_started_at_once_without_targets() -> None:
    job, log = run([external()])
    assert [type(e) for e in log] == [JobCreated, JobStarted]
    created, started = log
    assert isinstance(created, JobCreated) and created.kind == "external" and not created.targets
    assert isinstance(started, JobStarted) and started.flows_total == 0
    assert job.status == JobStatus.RUNNING and job.kind == "external"


def test_progress_is_recorded_once_per_change() -> None:
    job, log = run([external(), *(ReportProgress("j", p, f"{p}%") for p in (20, 20, 40, 40))])
    assert [e.percent for e in log if isinstance(e, JobProgressed)] == [20, 40]
    assert job.progress == 40


def test_a_summary_that_succeeded_completes_and_any_other_fails() -> None:
    done, log = run([external(), EndExternalJob("j", True)])
    assert done.status == JobStatus.COMPLETED and isinstance(log[-1], JobCompleted)
    failed, log = run([external(), EndExternalJob("j", False, "[SUMMARY] status 'error'")])
    assert failed.status == JobStatus.FAILED
    assert isinstance(log[-1], JobFailed) and log[-1].reason == "[SUMMARY] status 'error'"


def test_commands_of_one_kind_are_refused_for_the_other() -> None:
    job, _ = run([external()])
    for cmd in (PauseJob("j"), FinishJob("j", 0, 0)):
        with pytest.raises(Conflict, match="kind 'external'"):
            decide(job, cmd, META)
    flows = CreateJob("f", "n", (Target(url="http://a.test/", flows=1),), JobSettings(), Platform())
    job, _ = run([flows, StartJob("f", frozenset({"a.test"}))])
    with pytest.raises(Conflict, match="kind 'flows'"):
        decide(job, ReportProgress("f", 10), META)
    with pytest.raises(Conflict, match="kind 'flows'"):
        decide(job, EndExternalJob("f", True), META)


def test_an_external_job_with_targets_is_rejected() -> None:
    cmd = CreateJob("j", "n", (Target(url="http://a.test/", flows=1),), JobSettings(), Platform())
    with pytest.raises(Rejected, match="targets"):
        decide(Job(), CreateJob(**{**cmd.__dict__, "kind": "external"}), META)


EXTERNAL_COMMANDS = st.one_of(
    st.builds(ReportProgress, st.just("j"), st.integers(-5, 105)),
    st.builds(EndExternalJob, st.just("j"), st.booleans(), st.text(max_size=20)),
    st.just(CancelJob("j")),
    st.just(PauseJob("j")),
)


@given(st.lists(EXTERNAL_COMMANDS, max_size=12))
def test_an_external_job_ends_at_most_once_and_stays_ended(cmds: list[JobCommand]) -> None:
    job, log = run([external()])
    for cmd in cmds:
        before = job.status
        job, more = run([cmd], job)
        log.extend(more)
        if before in TERMINAL:
            assert job.status == before and not more
    ends = [e for e in log if type(e).__name__ in ("JobCompleted", "JobFailed", "JobCancelled")]
    assert len(ends) <= 1
    assert all(0 <= e.percent <= 100 for e in log if isinstance(e, JobProgressed))
    assert job.status in (JobStatus.RUNNING, *TERMINAL)


@given(st.lists(st.integers(0, 100), max_size=20))
def test_progress_events_follow_each_change_of_percent(percents: list[int]) -> None:
    job, log = run([external(), *(ReportProgress("j", p) for p in percents)])
    recorded = [e.percent for e in log if isinstance(e, JobProgressed)]
    changes = [p for i, p in enumerate(percents) if p != ([0, *percents][i])]
    assert recorded == changes
    assert job.progress == (percents[-1] if percents else 0)


# -- the events -------------------------------------------------------------------------


def test_a_job_created_before_kinds_existed_decodes_as_a_job_of_flows() -> None:
    old = (
        b'{"type":"JobCreated","id":"e","at":"2026-01-01T00:00:00Z","actor":"api","job_id":"j",'
        b'"name":"n","targets":[{"url":"http://a.test/","flows":1}],"settings":{}}'
    )
    event = decode_event(old)
    assert isinstance(event, JobCreated) and event.kind == "flows"


def test_a_job_of_flows_without_targets_does_not_decode() -> None:
    bad = (
        b'{"type":"JobCreated","id":"e","at":"2026-01-01T00:00:00Z","actor":"api","job_id":"j",'
        b'"name":"n","targets":[],"settings":{}}'
    )
    with pytest.raises(msgspec.ValidationError, match="targets"):
        decode_event(bad)


def test_external_job_events_round_trip_on_their_subjects() -> None:
    _, log = run(
        [external(), ReportProgress("j", 30, "[INFO] Progress: 30%"), EndExternalJob("j", True)]
    )
    for n, event in enumerate(log):
        subject = subjects.subject_for(event)
        headers = {
            subjects.EXPECTED_LAST_SUBJECT_SEQ: str(n),
            subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: subjects.job_stream_filter("j"),
        }
        assert decode_stored(subject, encode_event(event), headers) == event
    assert subjects.subject_for(log[2]) == "tb.job.j.JobProgressed"


def test_the_dispatcher_never_plans_an_external_job() -> None:
    state = DispatchState()
    _, log = run([external()])
    for seq, event in enumerate(log, 1):
        state.apply(Envelope(seq, subjects.subject_for(event), event))
    assert state.jobs == {} and state.plan(META.at) == []


# -- log lines --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "level"),
    [
        ("[INFO] Progress: 20% - Generated domain 1/5", "INFO"),
        ("[SUCCESS] done", "SUCCESS"),
        ("[ERROR] boom", "ERROR"),
        ('[SUMMARY] {"status": "success"}', "SUMMARY"),
        ("[warn] low disk", "WARNING"),
        ("plain text", "INFO"),
        ("", "INFO"),
    ],
)
def test_a_lines_level_comes_from_its_prefix(message: str, level: str) -> None:
    assert level_of(message) == level


@pytest.mark.parametrize(
    ("message", "percent"),
    [
        ("[INFO] Progress: 20% - Generated domain 1/5", 20),
        ("[INFO] Progress: 100%", 100),
        ("[INFO] Progress: 33.7%", 33),
        ("[INFO] Progress: 120%", None),
        ("[INFO] progress 20%", None),
        ("[ERROR] Progress: 20%", None),
    ],
)
def test_progress_lines(message: str, percent: int | None) -> None:
    assert progress_of(message) == percent


def test_summary_lines() -> None:
    ok = summary_of('[SUMMARY] {"status": "success", "domains_generated": {"success": 5}}')
    assert ok is not None and ok.succeeded and ok.outcome == ""
    bad = summary_of('[SUMMARY] {"status": "error"}')
    assert bad is not None and not bad.succeeded and bad.outcome == "[SUMMARY] status 'error'"
    garbage = summary_of("[SUMMARY] {not json")
    assert garbage is not None and garbage.data is None and "not JSON" in (garbage.problem or "")
    assert not garbage.succeeded and garbage.outcome.startswith("[SUMMARY] unreadable")
    listed = summary_of("[SUMMARY] [1, 2]")
    assert listed is not None and listed.problem == "not a JSON object"
    assert summary_of("[INFO] {}") is None


def test_a_flagged_summary_is_kept_as_text() -> None:
    line = log_line("j", "[SUMMARY] {oops", META.at, "ingest", summary_of("[SUMMARY] {oops"))
    assert line.message == "[SUMMARY] {oops" and line.summary is None and line.flag
    assert decode_log_line(encode_log_line(line)) == line


@given(st.text(max_size=300))
def test_any_text_is_a_line_that_round_trips(message: str) -> None:
    line = log_line("j", message, META.at, "ingest", summary_of(message))
    assert isinstance(line, LogLine)
    assert decode_log_line(encode_log_line(line)) == line
