"""The read side of licences: each user's plan, and the jobs a user runs at once."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

from projections.queries import plan_of, running_jobs
from projections.read_model import apply_batch, open_read_model
from schemas import subjects
from schemas.events import (
    Envelope,
    JobCompleted,
    JobCreated,
    JobPaused,
    JobRefused,
    JobStarted,
    LicenseAssigned,
    TbEvent,
    UserCreated,
)
from schemas.licences import DEFAULT_PLAN
from schemas.values import JobSettings, Target

AT = datetime(2026, 1, 1, tzinfo=UTC)
_ids = itertools.count(1)


def envelopes(*events: TbEvent) -> list[Envelope]:
    return [Envelope(seq, subjects.subject_for(e), e) for seq, e in enumerate(events, start=1)]


def assigned(user_id: str, plan: str) -> LicenseAssigned:
    return LicenseAssigned(id=f"e{next(_ids)}", at=AT, actor="admin", user_id=user_id, plan=plan)


def created(job_id: str, actor: str) -> JobCreated:
    return JobCreated(
        id=f"e{next(_ids)}",
        at=AT,
        actor=actor,
        job_id=job_id,
        name="j",
        targets=[Target(url="http://a.test/")],
        settings=JobSettings(),
    )


def started(job_id: str) -> JobStarted:
    return JobStarted(
        id=f"e{next(_ids)}", at=AT, actor="system", job_id=job_id, flows_total=1, allowed_hosts=[]
    )


async def test_the_last_assigned_plan_is_the_users_and_none_is_the_default(
    tmp_path: Path,
) -> None:
    db = await open_read_model(tmp_path / "read.db")
    try:
        history = envelopes(
            UserCreated(id="u", at=AT, actor="admin", user_id="ann", username="ann", role="viewer"),
            assigned("ann", "trial"),
            assigned("bob", "standard"),
            assigned("ann", "enterprise"),
        )
        await apply_batch(db, history[:2])
        assert await plan_of(db, "ann") == "trial"
        await apply_batch(db, history)  # the first two again: already applied
        assert await plan_of(db, "ann") == "enterprise"
        assert await plan_of(db, "bob") == "standard"
        assert await plan_of(db, "cid") == DEFAULT_PLAN
    finally:
        await db.close()


async def test_running_jobs_counts_a_users_started_jobs_until_they_end(tmp_path: Path) -> None:
    db = await open_read_model(tmp_path / "read.db")
    try:
        stop = JobCompleted(
            id="c", at=AT, actor="system", job_id="j1", flows_done=1, flows_failed=0
        )
        refuse = JobRefused(id="r", at=AT, actor="system", job_id="j3", reason="licence: x")
        pause = JobPaused(id="p", at=AT, actor="system", job_id="j2")
        history = envelopes(
            created("j1", "ann"),
            created("j2", "ann"),
            created("j3", "ann"),
            created("j4", "bob"),
            started("j1"),
            started("j2"),
            started("j4"),
            refuse,
            pause,
        )
        await apply_batch(db, history[:4])
        assert await running_jobs(db, "ann") == 0  # created, not started
        await apply_batch(db, history)
        assert (await running_jobs(db, "ann"), await running_jobs(db, "bob")) == (2, 1)
        await apply_batch(db, [Envelope(len(history) + 1, "tb.job.j1.JobCompleted", stop)])
        assert await running_jobs(db, "ann") == 1  # the paused one still counts
    finally:
        await db.close()
