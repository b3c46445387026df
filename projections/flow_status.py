"""How one flow's events fold into its status and into the done/failed counts.

Pure: the projection counts flows, not events. A flow adds at most one to
``done + failed`` however many attempts report an outcome.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.events import FlowDispatched, FlowDone, FlowFailed, FlowStarted

FlowStatus = Literal["queued", "running", "retrying", "done", "failed"]
FlowProgress = FlowDispatched | FlowStarted | FlowDone | FlowFailed

TERMINAL: frozenset[FlowStatus] = frozenset({"done", "failed"})
# within one attempt a flow only moves forward; a new attempt starts over
_RANK: dict[FlowStatus, int] = {"queued": 0, "running": 1, "retrying": 2}


class FlowState(msgspec.Struct, frozen=True):
    status: FlowStatus
    attempt: int


class Transition(msgspec.Struct, frozen=True):
    """The flow's state after an event, and what it adds to the counts (-1, 0 or 1)."""

    state: FlowState
    done: int = 0
    failed: int = 0

    @property
    def counted(self) -> bool:
        return bool(self.done or self.failed)


def flow_transition(old: FlowState | None, event: FlowProgress, max_attempts: int) -> Transition:
    attempt = max(old.attempt if old else 0, event.attempt)
    match event:
        case FlowDone():
            if old and old.status == "done":
                return Transition(old)
            # a late success (redelivery) turns a terminal failure into a done flow
            was_failed = old is not None and old.status == "failed"
            return Transition(FlowState("done", attempt), done=1, failed=-1 if was_failed else 0)
        case FlowFailed(retryable=retryable):
            if old and old.status in TERMINAL:
                return Transition(old)
            if not retryable or event.attempt >= max_attempts:
                return Transition(FlowState("failed", attempt), failed=1)
            new: FlowStatus = "retrying"
        case FlowStarted():
            new = "running"
        case FlowDispatched():
            new = "queued"
    if old is None:
        return Transition(FlowState(new, event.attempt))
    if old.status in TERMINAL or event.attempt < old.attempt:
        return Transition(old)  # stale news of an earlier attempt, or the flow is settled
    if event.attempt == old.attempt and _RANK[new] <= _RANK[old.status]:
        return Transition(old)
    return Transition(FlowState(new, event.attempt))
