"""Revoking a host's consent mid-job: its flows end, its jobs pause, resume finishes exact."""

from __future__ import annotations

from pathlib import Path

from agents.runner import Runner
from engine.bus import Bus
from engine.errors import Conflict
from schemas import subjects
from schemas.events import (
    CONSENT_REVOKED,
    ConsentRevoked,
    Envelope,
    FlowDispatched,
    FlowFailed,
    JobCompleted,
    JobPaused,
    JobRefused,
    JobResumed,
)
from schemas.values import Target
from tests.conftest import NatsServer
from tests.harness import SteadyExecutor, embedded, lifecycle_counts, log_until

HOST = "127.0.0.1"
URL = f"http://{HOST}:9/"


async def test_revocation_ends_in_flight_flows_pauses_the_job_and_resume_completes_it(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    flows = 6
    async with embedded(bus, nats_server.url, tmp_path) as tb:
        await tb.authorise(HOST)
        tb.run(Runner(bus, SteadyExecutor(1.0), slots=2).run(), "runner")
        job_id = await tb.create_job([Target(url=URL, flows=flows)], instance_count=2)
        await tb.wait_job(job_id, lambda v: v.flows_done >= 2)
        await tb.consents.revoke(HOST, "the owner withdrew", "owner")
        job_log = [subjects.job_stream_filter(job_id), subjects.flow_subject(job_id, "*")]
        before_pause = await log_until(bus, job_log, lambda e: isinstance(e.event, JobPaused))
        paused = before_pause[-1].event
        assert isinstance(paused, JobPaused) and paused.reason == f"consent revoked for {HOST}"
        # resuming is refused while the host has no valid consent, and so is a new job
        try:
            await tb.jobs.resume(job_id, "test")
        except Conflict as err:
            assert HOST in err.rule
        else:
            raise AssertionError("resumed without consent")
        refused_id = await tb.create_job([Target(url=URL, flows=1)])
        await log_until(
            bus,
            subjects.job_stream_filter(refused_id),
            lambda e: isinstance(e.event, JobRefused),
        )
        await tb.authorise(HOST)  # verified again
        await tb.jobs.resume(job_id, "test")
        history = await log_until(bus, job_log, lambda e: isinstance(e.event, JobCompleted))
        items = await work_items(bus, job_id)
        revoked_at = await revocation_seq(bus)
    completed = history[-1].event
    assert isinstance(completed, JobCompleted)
    counts = (completed.flows_done, completed.flows_failed)
    assert counts == lifecycle_counts(history, 3) and sum(counts) == flows
    ended = {
        e.event.flow_id
        for e in history
        if isinstance(e.event, FlowFailed) and e.event.reason == CONSENT_REVOKED
    }
    assert ended and all(  # every attempt in flight at the revocation ended, none retried
        not isinstance(e.event, FlowFailed) or not e.event.retryable
        for e in history
        if isinstance(e.event, FlowFailed) and e.event.flow_id in ended
    )
    assert completed.flows_failed == len(ended)
    resumed = next(e.seq for e in history if isinstance(e.event, JobResumed))
    assert not [i for i in items if revoked_at < i.seq < resumed]  # nothing went to the host
    assert {i.event.flow_id for i in items if isinstance(i.event, FlowDispatched)} >= ended


async def work_items(bus: Bus, job_id: str) -> list[Envelope]:
    return [
        env
        async for batch in bus.read(1, subjects.ALL_DISPATCH, follow=False)
        for env in batch
        if isinstance(env.event, FlowDispatched) and env.event.job_id == job_id
    ]


async def revocation_seq(bus: Bus) -> int:
    revocations = [
        env.seq
        async for batch in bus.read(1, subjects.consent_stream_filter(HOST), follow=False)
        for env in batch
        if isinstance(env.event, ConsentRevoked)
    ]
    return revocations[0]
