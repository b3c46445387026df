"""Job commands at the edge: load the aggregate, decide, append with optimistic concurrency.

Every command carries an id (the caller's ``Idempotency-Key``, or one minted once per
request): its events are appended with ``command_msg_id(command_id, n)``, so a retry of
the same command dedupes while another command at the same version conflicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from engine.bus import Appended, Bus, ConcurrencyConflict, Expect, applied_by, retry_on_conflict
from engine.devices import DeviceCatalogues
from engine.errors import CommandIdReused, Invalid, NotFound
from engine.jobs.decider import (
    CancelJob,
    CreateJob,
    EndExternalJob,
    FinishJob,
    Job,
    JobCommand,
    Meta,
    PauseJob,
    ReportProgress,
    ResumeJob,
    StartJob,
    decide,
    fold,
)
from schemas import subjects
from schemas.consent_state import Consent, consent_domains, evolve_consent, governing
from schemas.device_catalogue import ShippedCatalogues
from schemas.events import (
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobFailed,
    JobPaused,
    JobProgressed,
    JobRefused,
    JobResumed,
    JobStarted,
    TbEvent,
)
from schemas.ids import ID_RULE, is_valid_id, new_id, short_id, utcnow
from schemas.values import JobKind, JobSettings, Platform, Target, UsedVersion


def checked_job_id(job_id: str) -> str:
    """The id, if it is one: it becomes a subject token (``tb.job.<job_id>.*``)."""
    if not is_valid_id(job_id):
        raise Invalid("job_id", ID_RULE)
    return job_id


def job_id_for(command_id: str) -> str:
    """The job a keyed create makes: a retry of that create names the same job."""
    return f"job_{hashlib.blake2b(command_id.encode(), digest_size=10).hexdigest()}"


# what each command stores: a retried command id must have stored one of these
EMITS: dict[type, tuple[type, ...]] = {
    CreateJob: (JobCreated, JobStarted),  # an external job starts at once
    StartJob: (JobStarted, JobRefused),
    PauseJob: (JobPaused,),
    ResumeJob: (JobResumed,),
    CancelJob: (JobCancelled,),
    FinishJob: (JobCompleted, JobFailed),
    ReportProgress: (JobProgressed,),
    EndExternalJob: (JobCompleted, JobFailed),
}


@dataclass
class JobCommands:
    """``shipped``: the device catalogues this process has; a job records the version in
    use (the first job of a fresh system adopts one) and its device names are checked
    against it."""

    bus: Bus
    clock: Callable[[], datetime] = utcnow
    shipped: ShippedCatalogues = field(default_factory=ShippedCatalogues)

    async def load(self, job_id: str) -> Job:
        return (await self._history(job_id, None))[0]

    async def _history(
        self, job_id: str, command: JobCommand | None, command_id: str | None = None
    ) -> tuple[Job, Appended | None]:
        """The job, and where ``command_id`` already stored ``command``'s events (a retry);
        ``CommandIdReused`` when that id stored another command's."""
        envelopes = await self.bus.load(subjects.job_stream_filter(checked_job_id(job_id)))
        job = fold([(e.seq, e.event) for e in envelopes])
        before = applied_by(envelopes, command_id) if command_id else None
        if before is not None and command is not None:
            (stored,) = [e.event for e in envelopes if e.seq == before.seq]
            if not isinstance(stored, EMITS[type(command)]):
                raise CommandIdReused(type(stored).__name__)
        return job, before

    async def create(
        self,
        *,
        name: str,
        targets: list[Target],
        settings: JobSettings,
        platform: Platform,
        actor: str,
        command_id: str | None = None,
        kind: JobKind = "flows",
        allowed: Callable[[], Awaitable[None]] | None = None,
        datasets: Mapping[str, UsedVersion] | None = None,
    ) -> tuple[str, Appended]:
        """A new job; with a ``command_id`` (idempotency key) a retry answers the same job.

        ``allowed`` raises when the creator may not create it now (their licence): asked
        only for a create that did not run before, so a retry answers the job it made
        even once that job counts against the creator's limits."""
        if command_id is None:
            command_id, job_id = new_id(), short_id("job")
        else:
            job_id = job_id_for(command_id)
        cmd = CreateJob(
            job_id, name, tuple(targets), settings, platform, kind, dict(datasets or {})
        )
        _, before = await self._history(job_id, cmd, command_id)
        if before is not None:
            return job_id, before  # this create ran before: the same job
        version, catalogue = await DeviceCatalogues(self.bus, self.shipped).for_new_job()
        cmd = replace(cmd, device_catalogue=version, catalogue=catalogue)
        if allowed is not None:
            await allowed()
        try:
            return job_id, await self._append(Job(), cmd, actor, command_id)
        except ConcurrencyConflict:
            _, before = await self._history(job_id, cmd, command_id)
            if before is None:
                raise
            return job_id, before

    async def execute(
        self,
        cmd: JobCommand,
        actor: str,
        command_id: str | None = None,
        *,
        must_exist: bool = True,
    ) -> Appended:
        """Read-decide-append, re-reading when another writer got there first."""
        command = command_id or new_id()  # one id for this command, kept across retries

        async def attempt() -> Appended:
            job, before = await self._history(cmd.job_id, cmd, command)
            if before is not None:
                return before  # a retry of a command that was stored
            if must_exist and job.version == 0:
                raise NotFound("job_id", f"no job {cmd.job_id}")
            return await self._append(job, cmd, actor, command)

        return await retry_on_conflict(attempt)

    async def pause(
        self, job_id: str, actor: str, command_id: str | None = None, reason: str = ""
    ) -> Appended:
        return await self.execute(PauseJob(job_id, reason), actor, command_id)

    async def resume(self, job_id: str, actor: str, command_id: str | None = None) -> Appended:
        """Resume when every host of the job has valid consent now."""
        command = command_id or new_id()

        async def attempt() -> Appended:
            job, before = await self._history(job_id, ResumeJob(job_id, frozenset()), command)
            if before is not None:
                return before
            if job.version == 0:
                raise NotFound("job_id", f"no job {job_id}")
            now = self.clock()
            authorised = frozenset(
                [host for host in job.hosts if (await self._consent(host)).valid_at(now)]
            )
            return await self._append(job, ResumeJob(job_id, authorised), actor, command)

        return await retry_on_conflict(attempt)

    async def _consent(self, host: str) -> Consent:
        """The consent that governs ``host``: its own, or a parent's covering subdomains."""
        consents: dict[str, Consent] = {}
        for domain in consent_domains(host):
            consent = Consent(domain=domain)
            for env in await self.bus.load(subjects.consent_stream_filter(domain)):
                consent = evolve_consent(consent, env.event, env.seq)
            consents[domain] = consent
        return governing(consents, host) or Consent(domain=host)

    async def _append(self, job: Job, cmd: JobCommand, actor: str, command_id: str) -> Appended:
        meta = Meta(id=new_id(), at=self.clock(), actor=actor)
        stored = await append_decision(self.bus, job, cmd, meta, command_id)
        if not stored:
            return Appended(seq=job.version, duplicate=False)
        last = stored[-1][1]
        if last.duplicate:
            # the server had this message id: answer what this command stored, unless
            # the id named a command on another job
            _, before = await self._history(cmd.job_id, cmd, command_id)
            if before is None:
                raise CommandIdReused("on another job")
            return before
        return last


async def append_decision(
    bus: Bus, job: Job, cmd: JobCommand, meta: Meta, command_id: str
) -> list[tuple[TbEvent, Appended]]:
    """Decide, then append each event expecting the job's subjects not to have moved on.

    Raises ``ConcurrencyConflict`` when another writer got there first and ``Rejected``
    when the decider refuses the command; nothing is appended then.
    """
    scope = subjects.job_stream_filter(cmd.job_id)
    expected = job.version
    stored: list[tuple[TbEvent, Appended]] = []
    for n, event in enumerate(decide(job, cmd, meta)):
        appended = await bus.append(
            event,
            msg_id=subjects.command_msg_id(command_id, n),
            expect=Expect(scope, expected),
        )
        stored.append((event, appended))
        expected = appended.seq
    return stored
