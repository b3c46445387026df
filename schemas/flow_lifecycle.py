"""What a flow's events mean: the one rule both the dispatcher and the read model apply.

Pure. A flow adds at most one to ``done + failed``, and its first terminal outcome
stands. ``attempt`` is the dispatcher's counter (one per dispatch); ``tries`` counts
the attempts that were spent (failed or stalled), so a work item a runner released
unrun does not bring the flow closer to its attempt limit.

The dispatcher reads only FlowDispatched, FlowDone, FlowFailed, FlowStalled and
FlowReleased; FlowStarted changes a flow from queued to running and nothing else, so
the counts, attempts and tries come out the same with or without it (a property test
holds this).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.events import (
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    FlowStarted,
)

FlowStatus = Literal["queued", "running", "retrying", "released", "done", "failed"]
FlowProgress = FlowDispatched | FlowStarted | FlowDone | FlowFailed | FlowStalled | FlowReleased

TERMINAL: frozenset[FlowStatus] = frozenset({"done", "failed"})
IN_FLIGHT: frozenset[FlowStatus] = frozenset({"queued", "running"})
WAITING: frozenset[FlowStatus] = frozenset({"retrying", "released"})  # to be dispatched again


class FlowState(msgspec.Struct, frozen=True):
    status: FlowStatus
    attempt: int  # the latest dispatch seen
    tries: int = 0  # attempts spent: failed or stalled


class Transition(msgspec.Struct, frozen=True):
    """The flow's state after an event (``None``: still never dispatched), and what the
    event adds to the job's counts (0 or 1 each, never both)."""

    state: FlowState | None
    done: int = 0
    failed: int = 0

    @property
    def counted(self) -> bool:
        return bool(self.done or self.failed)


def flow_transition(
    old: FlowState | None, event: FlowProgress, *, max_attempts: int, job_open: bool = True
) -> Transition:
    """Fold one event into a flow's state.

    ``job_open`` is false once the job is refused, completed, failed or cancelled: its
    counts are final then (JobCompleted carries them), so late reports change nothing.
    """
    unchanged = Transition(old)
    if not job_open or (old is not None and old.status in TERMINAL):
        return unchanged  # the first outcome stands
    attempt = old.attempt if old is not None else 0
    tries = old.tries if old is not None else 0
    current = old is not None and event.attempt == attempt and old.status in IN_FLIGHT
    match event:
        case FlowDone():
            # any attempt's success is the flow's success, even one reported late
            return Transition(FlowState("done", max(attempt, event.attempt), tries), done=1)
        case FlowDispatched():
            if old is not None and event.attempt <= attempt:
                return unchanged  # seen again, or an older dispatch
            return Transition(FlowState("queued", event.attempt, tries))
        case FlowStarted():
            # only ever queued -> running of the current attempt: a reader that skips
            # FlowStarted (the dispatcher) must come to the same counts and attempts
            if current and old is not None and old.status == "queued":
                return Transition(FlowState("running", attempt, tries))
            return unchanged
        case FlowReleased():
            if not current:
                return unchanged
            return Transition(FlowState("released", attempt, tries))
        case FlowFailed() | FlowStalled():
            # an older attempt failing late, or this one's end seen twice: already settled
            if not (old is None or event.attempt > attempt or current):
                return unchanged
            spent = tries + 1
            attempt = max(attempt, event.attempt)
            retryable = isinstance(event, FlowStalled) or event.retryable
            if not retryable or spent >= max_attempts:
                return Transition(FlowState("failed", attempt, spent), failed=1)
            return Transition(FlowState("retrying", attempt, spent))
    raise AssertionError(f"unhandled flow event {event!r}")
