"""Job commands at the edge: load the aggregate, decide, append with optimistic concurrency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from engine.bus import Appended, Bus, Expect, retry_on_conflict
from engine.errors import NotFound
from engine.ids import new_id, short_id, utcnow
from engine.jobs.decider import CreateJob, Job, JobCommand, Meta, decide, fold
from schemas import subjects
from schemas.events import TbEvent
from schemas.values import JobSettings, Platform, Target


@dataclass
class JobCommands:
    bus: Bus
    clock: Callable[[], datetime] = utcnow

    async def load(self, job_id: str) -> Job:
        envelopes = await self.bus.load(subjects.job_stream_filter(job_id))
        return fold([(e.seq, e.event) for e in envelopes])

    async def create(
        self,
        *,
        name: str,
        targets: list[Target],
        settings: JobSettings,
        platform: Platform,
        actor: str,
    ) -> tuple[str, Appended]:
        job_id = short_id("job")
        cmd = CreateJob(job_id, name, tuple(targets), settings, platform)
        appended = await self._append(Job(), cmd, actor)
        return job_id, appended

    async def execute(self, cmd: JobCommand, actor: str, *, must_exist: bool = True) -> Appended:
        """Read-decide-append, re-reading when another writer got there first."""

        async def attempt() -> Appended:
            job = await self.load(cmd.job_id)
            if must_exist and job.version == 0:
                raise NotFound("job_id", f"no job {cmd.job_id}")
            return await self._append(job, cmd, actor)

        return await retry_on_conflict(attempt)

    async def _append(self, job: Job, cmd: JobCommand, actor: str) -> Appended:
        meta = Meta(id=new_id(), at=self.clock(), actor=actor)
        stored = await append_decision(self.bus, job, cmd, meta)
        return stored[-1][1] if stored else Appended(seq=job.version, duplicate=False)


async def append_decision(
    bus: Bus, job: Job, cmd: JobCommand, meta: Meta
) -> list[tuple[TbEvent, Appended]]:
    """Decide, then append each event expecting the job's subjects not to have moved on.

    Raises ``ConcurrencyConflict`` when another writer got there first and ``Rejected``
    when the decider refuses the command; nothing is appended then.
    """
    scope = subjects.job_stream_filter(cmd.job_id)
    expected = job.version
    stored: list[tuple[TbEvent, Appended]] = []
    for event in decide(job, cmd, meta):
        appended = await bus.append(
            event,
            msg_id=subjects.aggregate_msg_id(scope, expected, type(event).__name__),
            expect=Expect(scope, expected),
        )
        stored.append((event, appended))
        expected = appended.seq
    return stored
