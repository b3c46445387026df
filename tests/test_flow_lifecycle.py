"""The one flow rule: what a flow's events mean for its status and the job's counts."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from schemas.events import (
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    FlowStarted,
)
from schemas.flow_lifecycle import (
    TERMINAL,
    FlowProgress,
    FlowState,
    Transition,
    flow_transition,
)

AT = datetime(2026, 1, 1, tzinfo=UTC)
BASE = {"id": "e", "at": AT, "actor": "t", "job_id": "j", "flow_id": "f"}


def dispatched(attempt: int) -> FlowDispatched:
    return FlowDispatched(
        **BASE, attempt=attempt, target_index=0, url="http://a.test/", clicks=0,
        session_seconds=1.0, allowed_hosts=["a.test"], seed=1,
    )  # fmt: skip


def started(attempt: int) -> FlowStarted:
    return FlowStarted(**BASE, attempt=attempt, runner_id="r")


def done(attempt: int) -> FlowDone:
    return FlowDone(**BASE, attempt=attempt, runner_id="r", target_index=0)


def failed(attempt: int, retryable: bool = True) -> FlowFailed:
    return FlowFailed(**BASE, attempt=attempt, target_index=0, reason="x", retryable=retryable)


def stalled(attempt: int) -> FlowStalled:
    return FlowStalled(**BASE, attempt=attempt, target_index=0, waited_seconds=1.0)


def released(attempt: int) -> FlowReleased:
    return FlowReleased(**BASE, attempt=attempt, target_index=0, runner_id="r", reason="paused")


def fold(
    events: list[FlowProgress], max_attempts: int = 3, open_until: int | None = None
) -> tuple[FlowState | None, int, int]:
    state: FlowState | None = None
    done_n = failed_n = 0
    for n, event in enumerate(events):
        job_open = open_until is None or n < open_until
        step = flow_transition(state, event, max_attempts=max_attempts, job_open=job_open)
        state, done_n, failed_n = step.state, done_n + step.done, failed_n + step.failed
    return state, done_n, failed_n


def test_a_retryable_failure_is_retried_until_the_attempts_are_spent() -> None:
    events: list[FlowProgress] = []
    for attempt in (1, 2, 3):
        events += [dispatched(attempt), started(attempt), failed(attempt)]
    state, done_n, failed_n = fold(events[:-3])
    assert state == FlowState("retrying", 2, 2) and (done_n, failed_n) == (0, 0)
    state, done_n, failed_n = fold(events)
    assert state == FlowState("failed", 3, 3) and (done_n, failed_n) == (0, 1)


def test_a_release_gives_the_flow_back_without_spending_a_try() -> None:
    state, *_ = fold([dispatched(1), released(1), dispatched(2), failed(2), dispatched(3)])
    assert state == FlowState("queued", 3, 1)


def test_a_stall_spends_a_try_and_a_late_report_of_that_attempt_changes_nothing() -> None:
    state, *counts = fold([dispatched(1), stalled(1), failed(1, retryable=False)])
    assert state == FlowState("retrying", 1, 1) and counts == [0, 0]
    state, *counts = fold([dispatched(1), stalled(1), stalled(1)], max_attempts=1)
    assert state == FlowState("failed", 1, 1) and counts == [0, 1]


def test_the_first_outcome_stands() -> None:
    assert fold([dispatched(1), failed(1, retryable=False), done(1)])[1:] == (0, 1)
    assert fold([dispatched(1), done(1), failed(1, retryable=False)])[1:] == (1, 0)


def test_a_late_success_of_an_earlier_attempt_is_the_flows_success() -> None:
    state, *counts = fold([dispatched(1), failed(1), dispatched(2), done(1)])
    assert state == FlowState("done", 2, 1) and counts == [1, 0]


def test_nothing_changes_once_the_job_is_closed() -> None:
    events = [dispatched(1), started(1), done(1)]
    assert fold(events, open_until=2) == (FlowState("running", 1, 0), 0, 0)


attempts = st.integers(min_value=1, max_value=4)
flow_events = st.one_of(
    st.builds(dispatched, attempts),
    st.builds(started, attempts),
    st.builds(done, attempts),
    st.builds(failed, attempts, st.booleans()),
    st.builds(stalled, attempts),
    st.builds(released, attempts),
)


@given(st.lists(flow_events, max_size=40), st.integers(min_value=1, max_value=5))
def test_a_flow_is_counted_at_most_once(events: list[FlowProgress], max_attempts: int) -> None:
    state: FlowState | None = None
    done_n = failed_n = 0
    for event in events:
        was = state
        step = flow_transition(state, event, max_attempts=max_attempts)
        state, done_n, failed_n = step.state, done_n + step.done, failed_n + step.failed
        assert step.done in (0, 1) and step.failed in (0, 1)
        assert done_n + failed_n <= 1
        terminal = state is not None and state.status in TERMINAL
        assert (done_n + failed_n == 1) == terminal
        assert (done_n == 1) == (state is not None and state.status == "done")
        if was is not None and was.status in TERMINAL:
            assert state == was  # the first outcome stands
        if state is not None:
            assert state.tries <= max_attempts


def _without_started(events: list[FlowProgress]) -> list[FlowProgress]:
    return [e for e in events if not isinstance(e, FlowStarted)]


def _settled(state: FlowState | None) -> tuple[str, int, int] | None:
    """What the dispatcher can know: running and queued are both in flight to it."""
    if state is None:
        return None
    status = "queued" if state.status == "running" else state.status
    return (status, state.attempt, state.tries)


@given(st.lists(flow_events, max_size=40), st.integers(min_value=1, max_value=5))
def test_a_reader_that_skips_flow_started_reaches_the_same_counts_and_outcome(
    events: list[FlowProgress], max_attempts: int
) -> None:
    full, *full_counts = fold(events, max_attempts)
    lean, *lean_counts = fold(_without_started(events), max_attempts)
    assert full_counts == lean_counts
    assert _settled(full) == _settled(lean)


@given(st.lists(flow_events, max_size=30), st.integers(min_value=1, max_value=5))
def test_an_event_applied_twice_in_a_row_changes_nothing_more(
    events: list[FlowProgress], max_attempts: int
) -> None:
    state: FlowState | None = None
    for event in events:
        state = flow_transition(state, event, max_attempts=max_attempts).state
        again = flow_transition(state, event, max_attempts=max_attempts)
        assert again == Transition(state)
