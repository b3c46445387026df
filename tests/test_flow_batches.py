"""A batch is folded in memory (``projections.flows``, runner counts): whatever the batches,
the read model comes out as the events folded one at a time."""

from __future__ import annotations

import sqlite3
from typing import Any, get_args

from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from projections.db import create_schema
from projections.inline import InlineDatabase, as_connection, run_inline
from projections.read_model import SCHEMA, ProjectionUpdate, apply_batch
from projections.verify import tables
from schemas import subjects
from schemas.events import (
    EgressRefused,
    Envelope,
    FlowReleased,
    FlowStalled,
    FlowStarted,
    JobCancelled,
    JobCompleted,
    JobPaused,
    JobResumed,
    JobStarted,
    PageVisited,
    RunnerDraining,
    RunnerRegistered,
    TbEvent,
)
from schemas.values import Platform, Target
from tests.test_projections import dispatched, done, ev, failed, job

JOBS = ("job_a", "job_b")
RUNNERS = ("r1", "r2")

Step = tuple[str, int, int, int, bool]  # what, job, flow, attempt, a flag


def event_of(step: Step) -> TbEvent:
    what, j, f, attempt, flag = step
    job_id = JOBS[j]
    flow_id = f"{job_id}-f{f}"
    flow = {"job_id": job_id, "flow_id": flow_id, "attempt": attempt}
    runner = RUNNERS[f % 2]
    match what:
        case "created":
            target = Target(url="http://site.test/", flows=4, clicks=2)
            return job(job_id, target, max_attempts=attempt)
        case "started":
            return ev(JobStarted, job_id=job_id, flows_total=4, allowed_hosts=["site.test"])
        case "paused":
            return ev(JobPaused, job_id=job_id, reason="hold")
        case "resumed":
            return ev(JobResumed, job_id=job_id)
        case "closed" if flag:
            return ev(JobCompleted, job_id=job_id, flows_done=0, flows_failed=0)
        case "closed":
            return ev(JobCancelled, job_id=job_id, reason="enough")
        case "dispatched":
            return dispatched(job_id, flow_id, attempt, target=f % 2)
        case "running":
            return ev(FlowStarted, **flow, runner_id=runner)
        case "done":
            return replace(done(job_id, flow_id, attempt, clicks=f), runner_id=runner)
        case "failed":
            return replace(failed(job_id, flow_id, attempt, retryable=flag), runner_id=runner)
        case "stalled":
            return ev(FlowStalled, **flow, target_index=f % 2, waited_seconds=60.0)
        case "released":
            return ev(FlowReleased, **flow, target_index=0, runner_id=runner, reason="paused")
        case "page":
            return ev(PageVisited, **flow, url="http://site.test/", n=f)
        case "egress":
            fields: dict[str, Any] = {"host": "x.test", "port": 443, "reason": "no", "n": f}
            return ev(EgressRefused, **flow, **fields, request="CONNECT x.test:443")
        case "registered":
            platform = Platform()
            return ev(RunnerRegistered, runner_id=runner, platform=platform, slots=2)
        case _:
            return ev(RunnerDraining, runner_id=runner)


WHAT = st.sampled_from(
    [
        *("created", "started", "paused", "resumed", "closed", "registered", "draining"),
        *("dispatched", "dispatched", "running", "done", "failed", "failed", "stalled"),
        *("released", "page", "egress"),
    ]
)
STEPS = st.tuples(WHAT, st.integers(0, 1), st.integers(0, 3), st.integers(1, 3), st.booleans())


def folded(
    envelopes: list[Envelope], sizes: list[int]
) -> tuple[dict[str, list[tuple[Any, ...]]], ProjectionUpdate]:
    """The read model's rows after folding ``envelopes`` in batches of ``sizes`` (the
    last size repeating), and every update the batches reported, merged."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        db = as_connection(InlineDatabase(conn))
        run_inline(create_schema(db, SCHEMA))
        merged = ProjectionUpdate(seq=0)
        start, n = 0, 0
        while start < len(envelopes):
            size, n = sizes[min(n, len(sizes) - 1)], n + 1
            update = run_inline(apply_batch(db, envelopes[start : start + size]))
            start += size
            if update is not None:
                merged.job_ids.update(update.job_ids)
                merged.runner_ids.update(update.runner_ids)
        rows = {}
        for table, key in run_inline(tables(db)).items():
            order = ", ".join(key)
            rows[table] = conn.execute(f'SELECT * FROM "{table}" ORDER BY {order}').fetchall()
        return rows, merged
    finally:
        conn.close()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3),
    st.lists(STEPS, max_size=60),
    st.lists(st.integers(1, 12), min_size=1, max_size=8),
)
def test_a_history_folds_alike_in_any_batches(
    max_attempts: int, steps: list[Step], sizes: list[int]
) -> None:
    # job_a is created first; job_b maybe later or never (its creation aged out of the log)
    events = [event_of(("created", 0, 0, max_attempts, False))]
    events += [event_of(step) for step in steps]
    envelopes = [
        Envelope(seq=n, subject=subjects.subject_for(e), event=e)
        for n, e in enumerate(events, start=1)
    ]
    one_by_one, updates = folded(envelopes, [1])
    in_batches, batch_updates = folded(envelopes, sizes)
    assert in_batches == one_by_one
    assert (batch_updates.job_ids, batch_updates.runner_ids) == (
        updates.job_ids,
        updates.runner_ids,
    )


def test_event_classes_are_final() -> None:
    """The folds tell some events apart by their exact type (``flows.is_progress``)."""
    assert not [kind for kind in get_args(TbEvent) if kind.__subclasses__()]
