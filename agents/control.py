"""What a runner knows of job and consent state, learnt from the stream.

Commands reach runners through JetStream, never through core NATS alone: a runner
that was cut off, or starts later, still learns that a job was cancelled or paused
or that a host's consent was revoked. Two sources, folded by stream sequence, so
either may come first:

- a live follower, started with the runner, reading job-control and consent events
  from the stream's last sequence on (it tells the runner to stop flows at once);
- for a job or host the runner has not seen yet, one load of that aggregate before
  its first work item runs, kept in a bounded cache.

The follower confirms it has everything the stream holds at least every second; a
work item starts only while that confirmation is recent and was given since the
connection's last reconnect, so items fetched right after a reconnect wait until
the follower has caught up with what happened while the runner was away.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import nats.errors
import structlog

from agents.backoff import Backoff
from engine.bus import Bus
from schemas import subjects
from schemas.consent_state import (
    Consent,
    ConsentStatus,
    consent_domains,
    evolve_consent,
    governing,
)
from schemas.events import (
    CONSENT_REVOKED,
    ConsentEvent,
    ConsentRevoked,
    Envelope,
    FlowDispatched,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobPaused,
    JobRefused,
    JobResumed,
    JobStarted,
    TbEvent,
)
from schemas.ids import utcnow
from schemas.values import JobStatus

log = structlog.get_logger("tb.agent")

S = TypeVar("S")

# what the follower reads of jobs; each of these says all a runner needs on its own
# (the job's status now), so a job the follower saw start is never loaded
JOB_CONTROL_EVENTS = (JobStarted, JobCancelled, JobPaused, JobResumed, JobCompleted, JobFailed)
JOB_ENDED_EVENTS = (JobCancelled, JobCompleted, JobFailed)
FRESHNESS = 3.0  # seconds a follower's "caught up" stays good for starting work
FOLLOW_IDLE = 0.5  # the follower asks the server at least this often when idle
STOP_GRACE = 5.0  # seconds the follower gets to end once cancelled
FOLLOWED_KINDS = 2  # readers of the follower: job control, consents
ADMISSIONS_KEPT = 10_000  # distinct (job, target, allowed hosts) admissions remembered

AdmissionKey = tuple[str, str, tuple[str, ...]]

# -- job and consent state ----------------------------------------------------------

# what each event says of whether the job's work may run; other events say nothing
_STATUS_AFTER: dict[type[JobEvent], JobStatus] = {
    JobStarted: JobStatus.RUNNING,
    JobResumed: JobStatus.RUNNING,
    JobPaused: JobStatus.PAUSED,
    JobCancelled: JobStatus.CANCELLED,
    JobCompleted: JobStatus.COMPLETED,
    JobFailed: JobStatus.FAILED,
    JobRefused: JobStatus.REFUSED,
}


def fold_job(status: JobStatus, event: TbEvent, seq: int) -> JobStatus:
    """A job's status as far as running its work goes (the events that start, hold or
    end it; the job decider's ``evolve`` is the full rule)."""
    return _STATUS_AFTER.get(type(event), status) if isinstance(event, JobEvent) else status


@functools.lru_cache(maxsize=4096)  # a job's flows share a few target URLs
def target_host(url: str) -> str:
    """The host a work item's target URL names (the dispatcher's consent key)."""
    return (urlsplit(url).hostname or "").lower().rstrip(".")


# -- a bounded cache of aggregates --------------------------------------------------


@dataclass
class _Entry(Generic[S]):
    state: S
    seq: int = 0  # the stream sequence of the last event folded in
    loading: asyncio.Future[None] | None = None
    pending: list[tuple[int, TbEvent]] = field(default_factory=list)  # seen while loading


class Aggregates(Generic[S]):
    """Aggregate states by key, each folded in stream order from one load plus the
    follower's events; least recently used entries leave beyond ``cap``."""

    def __init__(
        self,
        cap: int,
        empty: Callable[[str], S],
        fold: Callable[[S, TbEvent, int], S],
        load: Callable[[str], Awaitable[list[Envelope]]],
    ) -> None:
        self.cap, self._empty, self._fold, self._load = cap, empty, fold, load
        self._entries: OrderedDict[str, _Entry[S]] = OrderedDict()
        self.loads = 0
        self.changes = 0  # grows whenever a known state changes, is loaded or leaves

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: str) -> S | None:
        """The state when it is known without waiting (``None``: load it first)."""
        entry = self._entries.get(key)
        if entry is None or entry.loading is not None:
            return None
        self._entries.move_to_end(key)
        return entry.state

    async def get(self, key: str) -> S:
        while True:
            entry = self._entries.get(key)
            if entry is None:
                return await self._load_into(key)
            if entry.loading is None:
                self._entries.move_to_end(key)
                return entry.state
            # someone else loads it: wait for them (if their load fails, try ours)
            await asyncio.wait({entry.loading})

    def apply(self, key: str, seq: int, event: TbEvent, *, complete: bool = False) -> None:
        """A follower's event: folded into a known entry, kept aside while it loads.

        ``complete``: the event alone gives the whole state (every later one will be
        followed too), so an unknown key gets an entry without a load."""
        entry = self._entries.get(key)
        if entry is None:
            if complete:
                self._entries[key] = _Entry(self._fold(self._empty(key), event, seq), seq)
                self.changes += 1
                self._evict()
            return  # a load will bring it when the key is needed
        if entry.loading is not None:
            entry.pending.append((seq, event))
        elif seq > entry.seq:
            entry.state, entry.seq = self._fold(entry.state, event, seq), seq
            self.changes += 1

    async def _load_into(self, key: str) -> S:
        loading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = _Entry(self._empty(key), loading=loading)
        self._entries[key] = entry
        self._evict()
        try:
            self.loads += 1
            envelopes = await self._load(key)
        except BaseException:
            if self._entries.get(key) is entry:
                del self._entries[key]
            loading.set_result(None)  # waiters look again and load themselves
            raise
        for seq, event in [(e.seq, e.event) for e in envelopes] + sorted(
            entry.pending, key=lambda p: p[0]
        ):
            if seq > entry.seq:
                entry.state, entry.seq = self._fold(entry.state, event, seq), seq
        entry.pending.clear()
        entry.loading = None
        self.changes += 1
        loading.set_result(None)
        return entry.state

    def _evict(self) -> None:
        for _ in range(len(self._entries) - self.cap):
            key, oldest = next(iter(self._entries.items()))
            if oldest.loading is None:
                del self._entries[key]
                self.changes += 1
            else:  # being loaded: someone needs it now
                self._entries.move_to_end(key)


# -- admission ----------------------------------------------------------------------


class Verdict(Enum):
    RUN = "run"
    DROP = "drop"  # the job is over: ack, report nothing (the dispatcher let it go)
    RELEASE = "release"  # the job is paused: hand the item back without spending an attempt
    REVOKED = "revoked"  # no valid consent for the target host: the flow fails, not retried


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    reason: str = ""
    hosts: frozenset[str] = frozenset()  # to run: the allowed hosts whose consent holds now


class Control:
    """Job and consent state for the runner's work items, and word when it changes."""

    def __init__(
        self,
        bus: Bus,
        *,
        cap: int = 10_000,
        freshness: float = FRESHNESS,
        on_job_ended: Callable[[str], None] = lambda job_id: None,
        on_host_revoked: Callable[[str], None] = lambda host: None,
    ) -> None:
        self.bus, self.freshness = bus, freshness
        self.on_job_ended, self.on_host_revoked = on_job_ended, on_host_revoked
        self.jobs: Aggregates[JobStatus] = Aggregates(
            cap, lambda _: JobStatus.NEW, fold_job, self._load_job
        )
        self.consents: Aggregates[Consent] = Aggregates(
            cap, lambda host: Consent(domain=host), evolve_consent, self._load_consent
        )
        self._fresh_until = float("-inf")
        self._confirmed_reconnects = -1
        self._stats: dict[str, int] = bus.nc.stats  # the client keeps counting in this dict
        self._confirmed = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._position = 0  # the stream's last sequence when the follower started
        self._caught_up_at: dict[str, tuple[float, int]] = {}  # reader: (when, reconnects)
        # admissions worked out, until job or consent state changes or a consent expires
        self._admitted: dict[AdmissionKey, tuple[int, float, Admission]] = {}
        # hosts admitted to run, with when their consent expires: an expired consent is
        # a revoked one, so their flows are told when it lapses unless it was renewed
        self._expiring: dict[str, datetime] = {}

    # -- the live follower --------------------------------------------------------------

    async def start(self) -> None:
        """Follow control events from the stream's end on (retrying until NATS answers)."""
        retry = Backoff("control.start", base=0.2, cap=5.0)
        while True:
            try:
                last = await self.bus.last_seq()
                break
            except nats.errors.Error as err:
                await retry.wait(err)
        retry.succeeded()
        self._position = last
        self._follower = asyncio.create_task(self._follow(), name="runner-control")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            # bounded: a library that swallows a cancel must not hold the runner's exit
            await asyncio.wait({self._follower}, timeout=STOP_GRACE)

    async def _follow(self) -> None:
        # one reader per aggregate kind, each with a single filter: a runner's NATS user
        # may create readers only for filters within tb.job.> and tb.consent.> (the
        # filter is part of the create request's subject), never one of several filters
        readers = [
            self._follow_one(kind, stream_filter)
            for kind, stream_filter in (("jobs", subjects.all_jobs()), ("consents", "tb.consent.>"))
        ]
        await asyncio.gather(*readers)

    async def _follow_one(self, kind: str, stream_filter: str) -> None:
        position = self._position
        retry = Backoff(f"control.follow.{kind}", base=0.2, cap=5.0)
        while True:
            try:
                async for batch in self.bus.read_batches(
                    position + 1,
                    stream_filter,
                    idle_timeout=FOLLOW_IDLE,
                    on_caught_up=functools.partial(self._caught_up, kind),
                ):
                    retry.succeeded()
                    for env in batch.envelopes:
                        self._apply(env)
                    position = batch.last_seq
            except nats.errors.Error as err:  # the reader gave up on this connection
                if self.bus.nc.is_closed:
                    return
                await retry.wait(err)

    def _apply(self, env: Envelope) -> None:
        event = env.event
        if isinstance(event, JOB_CONTROL_EVENTS):
            # the follower sees every control event from its start on, and each one
            # states the job's status: the latest is the whole story
            self.jobs.apply(event.job_id, env.seq, event, complete=True)
            if isinstance(event, JOB_ENDED_EVENTS):
                self.on_job_ended(event.job_id)
        elif isinstance(event, ConsentEvent):
            host = event.domain.lower()
            self.consents.apply(host, env.seq, event)
            if isinstance(event, ConsentRevoked):
                self.on_host_revoked(host)
            # subdomains whose flows run here on its consent, which may cover them no more
            # (revoked, or verified again without its subdomains)
            for sub in [h for h in self._expiring if h.endswith(f".{host}")]:
                if self._lapsed(sub, utcnow()):
                    del self._expiring[sub]
                    self.on_host_revoked(sub)

    def _caught_up(self, kind: str) -> None:
        """``kind``'s reader has seen all; fresh while both readers have, recently."""
        self._caught_up_at[kind] = (time.monotonic(), self._reconnects())
        if len(self._caught_up_at) < FOLLOWED_KINDS:
            return
        self._fresh_until = min(at for at, _ in self._caught_up_at.values()) + self.freshness
        reconnects = {n for _, n in self._caught_up_at.values()}
        self._confirmed_reconnects = reconnects.pop() if len(reconnects) == 1 else -1
        self._confirmed.set()
        self._expire()

    def _expire(self) -> None:
        """Tell the flows on hosts whose consent has expired (and was not renewed)."""
        now = utcnow()
        for host, at in list(self._expiring.items()):
            if at > now:
                continue
            consent = governing(self.consents.peek, host)
            if consent is not None and consent.valid_at(now) and consent.expires_at:
                self._expiring[host] = consent.expires_at  # renewed meanwhile
                continue
            del self._expiring[host]
            self.on_host_revoked(host)

    def _lapsed(self, host: str, now: datetime) -> bool:
        consent = governing(self.consents.peek, host)
        return consent is None or not consent.valid_at(now)

    def _watch_expiry(self, admission: Admission, consents: dict[str, Consent]) -> None:
        if admission.verdict is not Verdict.RUN:
            return
        if len(self._expiring) >= ADMISSIONS_KEPT:
            self._expiring.clear()
        for host in admission.hosts:
            consent = governing(consents, host)
            if consent is not None and consent.expires_at is not None:
                self._expiring[host] = consent.expires_at

    def _reconnects(self) -> int:
        return int(self._stats.get("reconnects", 0))

    def fresh(self, now: float | None = None) -> bool:
        """Whether the follower has, recently and since the last reconnect, seen all."""
        return (
            self._confirmed_reconnects == self._reconnects()
            and (now if now is not None else time.monotonic()) < self._fresh_until
        )

    async def wait_fresh(self) -> None:
        while not self.fresh():
            self._confirmed.clear()
            await self._confirmed.wait()

    # -- lazy loads ---------------------------------------------------------------------

    async def _load_job(self, job_id: str) -> list[Envelope]:
        return await self.bus.load(subjects.job_stream_filter(job_id))

    async def _load_consent(self, host: str) -> list[Envelope]:
        return await self.bus.load(subjects.consent_stream_filter(host))

    # -- admission ----------------------------------------------------------------------

    def admit_now(self, item: FlowDispatched) -> Admission | None:
        """The admission when it needs no waiting (the hot path), else ``None``.

        A job's work items share their admission: it is worked out once and kept
        until job or consent state changes or one of the consents expires.
        """
        now = time.monotonic()
        # ``fresh()``, inlined: this runs for every work item
        if now >= self._fresh_until or self._stats["reconnects"] != self._confirmed_reconnects:
            return None
        key = (item.job_id, item.url, tuple(item.allowed_hosts))
        generation = self.jobs.changes + self.consents.changes
        known = self._admitted.get(key)
        if known is not None and known[0] == generation and now < known[1]:
            return known[2]
        status = self.jobs.peek(item.job_id)
        if status is None:
            return None
        if status != JobStatus.RUNNING:
            return self._keep(key, generation, float("inf"), _job_admission(status))
        consents: dict[str, Consent] = {}
        for domain in _domains(item):
            consent = self.consents.peek(domain)
            if consent is None:
                return None
            consents[domain] = consent
        at = utcnow()
        admission = _consent_admission(item, consents, at)
        self._watch_expiry(admission, consents)
        expiries = [c.expires_at for c in consents.values() if c.expires_at and c.expires_at > at]
        left = (min(expiries) - at).total_seconds() if expiries else float("inf")
        return self._keep(key, generation, now + left, admission)

    def _keep(
        self, key: AdmissionKey, generation: int, until: float, admission: Admission
    ) -> Admission:
        if len(self._admitted) >= ADMISSIONS_KEPT:
            self._admitted.clear()
        self._admitted[key] = (generation, until, admission)
        return admission

    async def admit(self, item: FlowDispatched) -> Admission:
        await self.wait_fresh()
        status = await self.jobs.get(item.job_id)
        if status != JobStatus.RUNNING:
            return _job_admission(status)
        domains = sorted(_domains(item))
        loaded = await asyncio.gather(*(self.consents.get(domain) for domain in domains))
        consents = dict(zip(domains, loaded, strict=True))
        admission = _consent_admission(item, consents, utcnow())
        self._watch_expiry(admission, consents)
        return admission


def _hosts(item: FlowDispatched) -> Iterable[str]:
    yield target_host(item.url)
    for host in item.allowed_hosts:
        yield host.lower().rstrip(".")


def _domains(item: FlowDispatched) -> set[str]:
    """Every domain whose consent may govern a host of the item (its own, its parents')."""
    return {domain for host in _hosts(item) for domain in consent_domains(host)}


def _job_admission(status: JobStatus) -> Admission:
    if status == JobStatus.PAUSED:
        return Admission(Verdict.RELEASE, "job paused")
    return Admission(Verdict.DROP, f"job {status.value}")


def _consent_admission(
    item: FlowDispatched, consents: dict[str, Consent], now: datetime
) -> Admission:
    host = target_host(item.url)
    target = governing(consents, host)
    if target is None or not target.valid_at(now):
        if target is not None and target.status == ConsentStatus.REVOKED:
            return Admission(Verdict.REVOKED, CONSENT_REVOKED)
        return Admission(Verdict.REVOKED, f"no valid consent for {host}")
    hosts = frozenset(
        h for h in _hosts(item) if (c := governing(consents, h)) is not None and c.valid_at(now)
    )
    return Admission(Verdict.RUN, hosts=hosts)
