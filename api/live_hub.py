"""The live hub: what the projector changed, read once and fanned out to every client.

The projector tells the hub, right after a batch commits, which jobs, runners and
proxies it changed. The hub merges those notices until it is free, reads the changed
rows in one read transaction (so every message agrees with the tables at the ``seq``
it carries) and hands each client the encoded messages it asked for: bursts coalesce
into one ``progressUpdate`` per job per read, however many events came in between.

Each client has a bounded queue of bundles: one bundle per read (or per published
message), holding the frames of that read it asked for, shared with every other client.
A client whose queue is full is cut off (``overflowed`` is set and its handler closes
it) and counted in ``dropped``: a client that does not read never holds back the
projector, the hub, or the other clients, and a burst of many jobs is one bundle, so a
client that keeps up is never cut off by a burst.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import aiosqlite
import msgspec
import structlog

from api.live_messages import (
    JobInfo,
    ProxyUpdate,
    RunnerUpdate,
    click_done_update,
    flow_done_update,
    job_info,
    progress_update,
)
from engine.cancellation import stop_task
from projections import db as read_db
from projections import proxies as proxy_views
from projections import queries
from projections.projector import ProjectionUpdate, Projector
from projections.queries import JobView
from projections.read_model import applied_seq
from schemas.ids import utcnow
from schemas.values import TERMINAL_JOB_STATUSES

log = structlog.get_logger("tb.api.live")

# job: for the job's clients; chosen: only for clients that chose the job; reply: to one
Kind = Literal["job", "chosen", "runner", "proxy", "reply"]

READ_CHUNK = 500  # ids per IN (…) query
# what the hub keeps of open jobs to see what changed, in target rows (a job counts one
# more): the oldest is forgotten past it, and then its next update says it all again
REMEMBERED_ROWS = 200_000

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Frame:
    """One encoded message; ``job_id`` is the job it is about (None: runners, proxies);
    ``ends_job``: the job was closed when it was read, nothing more will come for it."""

    text: str
    job_id: str | None = None
    ends_job: bool = False
    kind: Kind = "job"


def frame(
    message: msgspec.Struct, job_id: str | None = None, ends_job: bool = False, kind: Kind = "job"
) -> Frame:
    return Frame(_encode(message).decode(), job_id, ends_job, kind)


@dataclass(eq=False)
class Listener:
    """One client: what it wants and its bounded queue of bundles of frames.

    ``jobs`` None: every job; else only those. ``runners``/``proxies``: whether it gets
    runner and proxy updates."""

    queue: asyncio.Queue[list[Frame]]
    jobs: set[str] | None = None
    runners: bool = True
    proxies: bool = True
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    on_overflow: Callable[[], object] | None = None  # e.g. cancel a write stuck on the client

    def wants(self, f: Frame) -> bool:
        if f.kind == "job":
            return self.jobs is None or f.job_id in self.jobs
        if f.kind == "chosen":
            return self.jobs is not None and f.job_id in self.jobs
        return self.runners if f.kind == "runner" else self.proxies if f.kind == "proxy" else True


@dataclass
class _Changes:
    job_ids: set[str] = field(default_factory=set)
    runner_ids: set[str] = field(default_factory=set)
    proxy_ids: set[str] = field(default_factory=set)

    def merge(self, update: ProjectionUpdate) -> None:
        self.job_ids |= update.job_ids
        self.runner_ids |= update.runner_ids
        self.proxy_ids |= update.proxy_ids

    def __bool__(self) -> bool:
        return bool(self.job_ids or self.runner_ids or self.proxy_ids)


@dataclass(frozen=True)
class _Snapshot:
    listener: Listener
    job_ids: set[str]
    missing: asyncio.Future[set[str]]


@dataclass(frozen=True)
class _Seen:
    """What the hub last told about a job, to tell only what changed next time."""

    status: str
    reason: str | None
    approval: str | None
    counts: tuple[int, int, int]  # flows_total, flows_done, flows_failed
    targets: tuple[tuple[int, int, int], ...]  # flow_done, flow_failed, click_done per idx


def _seen(job: JobView) -> _Seen:
    counts = (job.flows_total, job.flows_done, job.flows_failed)
    targets = tuple((t.flow_done, t.flow_failed, t.click_done) for t in job.targets)
    return _Seen(job.status.value, job.reason, job.approval, counts, targets)


class LiveHub:
    def __init__(self, projector: Projector, db_path: Path, *, queue_size: int = 256) -> None:
        """``queue_size``: bundles (reads, published messages) a client may have unsent
        before it is cut off."""
        self.projector, self.db_path, self.queue_size = projector, db_path, queue_size
        self.dropped = 0  # clients cut off for not reading
        self.stopped = False
        self.reads = 0  # read transactions that produced messages (bursts coalesce)
        self._listeners: set[Listener] = set()
        self._pending = _Changes()
        self._wake = asyncio.Event()
        self._snapshots: list[_Snapshot] = []
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._seen_rows = 0
        self._db: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._db = await read_db.connect(self.db_path, readonly=True)
        self.projector.listen(self._notice)
        self._task = asyncio.create_task(self._run(), name="live-hub")

    async def stop(self) -> None:
        self.stopped = True
        self.projector.unlisten(self._notice)
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
        for listener in self._listeners:
            listener.overflowed.set()  # wake handlers: the hub is gone
        for request in self._snapshots:
            request.missing.cancel()
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    @property
    def clients(self) -> int:
        return len(self._listeners)

    # -- clients ------------------------------------------------------------------------

    def listen(self, jobs: set[str] | None = None, *, fleet: bool = True) -> Listener:
        listener = Listener(asyncio.Queue(self.queue_size), jobs, fleet, fleet)
        self._listeners.add(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def publish(self, job_id: str, message: msgspec.Struct, *, chosen_only: bool = False) -> None:
        """Send ``message`` (a tagged Struct, e.g. a log line) to the clients of ``job_id``:
        those that chose it (WebSocket subscribers, its SSE streams) and, unless
        ``chosen_only``, those that take every job (the dashboard)."""
        kind: Kind = "chosen" if chosen_only else "job"
        self._fan_out([frame(message, job_id, kind=kind)], to_all=not chosen_only)

    def send(self, listener: Listener, message: msgspec.Struct) -> None:
        """A message to one client alone (an answer to what it sent)."""
        self._offer(listener, [frame(message, kind="reply")])

    async def snapshot(self, listener: Listener, job_ids: Iterable[str]) -> set[str]:
        """Queue the current ``jobInfo`` and ``progressUpdate`` of each job for this client,
        in order with what the hub sends next; returns the ids the read model lacks."""
        if self.stopped:
            raise RuntimeError("live hub stopped")
        request = _Snapshot(listener, set(job_ids), asyncio.get_running_loop().create_future())
        self._snapshots.append(request)
        self._wake.set()
        return await request.missing

    # -- the loop -----------------------------------------------------------------------

    def _notice(self, update: ProjectionUpdate) -> None:
        """Called by the projector after each commit: merge and wake, nothing more."""
        if self._listeners:
            self._pending.merge(update)
            self._wake.set()

    async def _run(self) -> None:
        """Every read happens here, one at a time: a client that goes away mid-read
        cannot leave the connection inside a transaction, and messages keep their order."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            changes, self._pending = self._pending, _Changes()
            snapshots, self._snapshots = self._snapshots, []
            try:
                if changes and self._listeners:
                    await self._emit(changes)
                for request in snapshots:
                    await self._snapshot(request)
            except Exception as err:
                # one read that fails (a locked file, a row that does not convert) must
                # not end live updates for everyone: the next batch reads the rows afresh
                log.exception("live.read_failed", error=repr(err))
                for request in snapshots:
                    if not request.missing.done():
                        request.missing.set_exception(err)

    async def _snapshot(self, request: _Snapshot) -> None:
        async with self._read() as (db, seq):
            jobs = await _jobs(db, request.job_ids)
        now = utcnow()
        frames = []
        for job in jobs:
            ends = job.status in TERMINAL_JOB_STATUSES
            frames.append(frame(job_info(job, seq), job.job_id))
            frames.append(frame(progress_update(job, seq, now), job.job_id, ends))
        self._offer(request.listener, frames)
        if not request.missing.done():
            request.missing.set_result(request.job_ids - {job.job_id for job in jobs})

    async def _emit(self, changes: _Changes) -> None:
        async with self._read() as (db, seq):
            jobs = await _jobs(db, changes.job_ids)
            runners = [
                r
                for chunk in _chunks(changes.runner_ids)
                for r in await queries.list_runners(db, chunk)
            ]
            proxies = [
                p
                for pid in sorted(changes.proxy_ids)
                if (p := await proxy_views.get_proxy(db, pid)) is not None
            ]
        self.reads += 1
        # runners and proxies first: a job's last update closes the read for its clients
        frames = [
            frame(RunnerUpdate(runner_id=r.runner_id, runner=r, seq=seq), kind="runner")
            for r in runners
        ]
        frames += [
            frame(ProxyUpdate(proxy_id=p.proxy_id, proxy=p, seq=seq), kind="proxy") for p in proxies
        ]
        now = utcnow()
        for job in jobs:
            frames += self._job_frames(job, seq, now)
        self._fan_out(frames)

    def _job_frames(self, job: JobView, seq: int, now: datetime) -> list[Frame]:
        """jobInfo when its status changed, a flowDone/clickDone update per target whose
        counts changed, and its progressUpdate last when any count or the status changed
        (a flow dispatched or started changes none: no message)."""
        before, after = self._forget(job.job_id), _seen(job)
        ends = job.status in TERMINAL_JOB_STATUSES
        if not ends:  # a closed job's counts stand: nothing to compare it with later
            self._remember(job.job_id, after)
        out: list[Frame] = []
        if before is None or (before.status, before.reason, before.approval) != (
            after.status,
            after.reason,
            after.approval,
        ):
            out.append(frame(job_info(job, seq), job.job_id))
        old = before.targets if before is not None else ()
        for i, target in enumerate(job.targets):
            was = old[i] if i < len(old) else (0, 0, 0)
            if (target.flow_done, target.flow_failed) != was[:2]:
                out.append(frame(flow_done_update(job.job_id, target, seq), job.job_id))
            if target.click_done != was[2]:
                out.append(frame(click_done_update(job.job_id, target, seq), job.job_id))
        if before != after:
            out.append(frame(progress_update(job, seq, now), job.job_id, ends))
        return out

    def _remember(self, job_id: str, seen: _Seen) -> None:
        self._seen[job_id] = seen
        self._seen_rows += 1 + len(seen.targets)
        while self._seen_rows > REMEMBERED_ROWS:
            self._forget(next(iter(self._seen)))

    def _forget(self, job_id: str) -> _Seen | None:
        seen = self._seen.pop(job_id, None)
        if seen is not None:
            self._seen_rows -= 1 + len(seen.targets)
        return seen

    def _fan_out(self, frames: list[Frame], *, to_all: bool = True) -> None:
        """``to_all``: every frame goes to a client that takes everything."""
        for listener in list(self._listeners):
            if to_all and listener.jobs is None and listener.runners and listener.proxies:
                self._offer(listener, frames)  # the dashboard's case: the list as it is
            else:
                self._offer(listener, [f for f in frames if listener.wants(f)])

    def _offer(self, listener: Listener, bundle: list[Frame]) -> None:
        if listener.overflowed.is_set() or not bundle:
            return
        try:
            listener.queue.put_nowait(bundle)
        except asyncio.QueueFull:
            listener.overflowed.set()
            self._listeners.discard(listener)
            self.dropped += 1
            if listener.on_overflow is not None:
                listener.on_overflow()
            log.warning("live.client_dropped", queued=listener.queue.qsize(), dropped=self.dropped)

    def _read(self) -> _ReadTransaction:
        if self._db is None:
            raise RuntimeError("live hub not started")
        return _ReadTransaction(self._db)


class _ReadTransaction:
    """``BEGIN`` … ``COMMIT`` on the hub's read-only connection: every row read inside,
    and the checkpoint it yields, are of one committed state."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def __aenter__(self) -> tuple[aiosqlite.Connection, int]:
        await self.db.execute("BEGIN")
        try:
            return self.db, await applied_seq(self.db)
        except BaseException:
            await self.db.execute("ROLLBACK")
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.db.execute("COMMIT" if exc[0] is None else "ROLLBACK")


async def _jobs(db: aiosqlite.Connection, job_ids: set[str]) -> list[JobView]:
    """The jobs of ``job_ids`` the read model holds, by id."""
    found = [job for chunk in _chunks(job_ids) for job in await queries.get_jobs(db, chunk)]
    return sorted(found, key=lambda job: job.job_id)


def _chunks(ids: set[str]) -> Iterator[list[str]]:
    ordered = sorted(ids)
    for start in range(0, len(ordered), READ_CHUNK):
        yield ordered[start : start + READ_CHUNK]


__all__ = ["Frame", "JobInfo", "Listener", "LiveHub"]
