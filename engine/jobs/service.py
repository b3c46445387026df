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
        scope = subjects.job_stream_filter(cmd.job_id)
        appended = Appended(seq=job.version, duplicate=False)
        expected = job.version
        for event in decide(job, cmd, meta):
            appended = await self.bus.append(
                event,
                msg_id=subjects.aggregate_msg_id(scope, expected, type(event).__name__),
                expect=Expect(scope, expected),
            )
            expected = appended.seq
        return appended
