"""The dispatcher's checkpoint: its state and the last stream sequence the reader applied.

A snapshot is a cache of the log, never the truth: one that is missing, unreadable or
of another format means "read the log from sequence 1", never an error. It may hold
the effects of the dispatcher's own appends beyond ``position``; reading them again
changes nothing, because ``DispatchState.apply`` is idempotent.

Format (msgpack): a ``Snapshot`` map whose ``format`` is read first. Bump
``SNAPSHOT_FORMAT`` whenever what ``apply`` folds in changes meaning (a new event
type, a new field of ``Job``, ``Consent`` or ``FlowSlot`` that the log sets): a
snapshot written by older code would then lack effects that a replay would have.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
import structlog

from engine.bus import Bus
from engine.dispatch.state import DispatchState, FlowSlot, FlowStatus, JobPlan
from engine.jobs.decider import Job
from schemas import subjects
from schemas.consent_state import Consent
from schemas.flow_lifecycle import FlowState
from schemas.proxy_state import ProxyState

log = structlog.get_logger("tb.dispatcher.snapshot")

# 2: finished jobs leave the state; 3: flows hold their lifecycle state and dispatch
# time, jobs their hosts and whether they are broken; 4: flows hold their work item's
# sequence and when it was seen delivered; 5: the registered proxies and their health;
# 6: job settings carry the flow behaviour (older code could not decode a job created
# with them, so its snapshot lacks the job); 7: consents hold their ports; 8: jobs hold
# their creator, the state the users' plans and the open external jobs; 9: consents
# hold their claimed caps, how they were verified and whether they cover subdomains;
# 10: jobs hold the device catalogue version they were created with
SNAPSHOT_FORMAT = 10
SNAPSHOT_OBJECT = "state"


class FlowRecord(msgspec.Struct, frozen=True, array_like=True):
    flow_id: str
    target_index: int
    host: str
    flow: FlowState | None
    dispatched_at: datetime | None
    item_seq: int
    delivered_at: datetime | None


class JobRecord(msgspec.Struct, frozen=True, array_like=True):
    job: Job
    created_seq: int
    hosts: list[str]
    flows: list[FlowRecord]
    queue: list[int]  # indexes into ``flows``, in queue order
    done: int
    failed: int
    broken: str


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    position: int
    jobs: list[JobRecord]
    consents: list[Consent]
    domain_in_flight: dict[str, int]
    domain_recent: dict[str, list[datetime]]
    proxies: list[ProxyState] = []
    plans: dict[str, str] = {}
    external_jobs: dict[str, str] = {}


class _Header(msgspec.Struct):
    format: int = 0


_encoder = msgspec.msgpack.Encoder()
_header = msgspec.msgpack.Decoder(_Header)
_decoder = msgspec.msgpack.Decoder(Snapshot)


def encode(state: DispatchState) -> bytes:
    """The whole state as bytes; synchronous, so no event can land halfway through."""
    jobs = []
    for plan in state.jobs.values():
        index = {fid: n for n, fid in enumerate(plan.flows)}
        jobs.append(
            JobRecord(
                job=plan.job,
                created_seq=plan.created_seq,
                hosts=list(plan.hosts),
                flows=[
                    FlowRecord(
                        s.flow_id,
                        s.target_index,
                        s.host,
                        s.flow,
                        s.dispatched_at,
                        s.item_seq,
                        s.delivered_at,
                    )
                    for s in plan.flows.values()
                ],
                queue=[index[fid] for fid in plan.queue],
                done=plan.done,
                failed=plan.failed,
                broken=plan.broken,
            )
        )
    return _encoder.encode(
        Snapshot(
            format=SNAPSHOT_FORMAT,
            position=state.position,
            jobs=jobs,
            consents=list(state.consents.values()),
            domain_in_flight={d: n for d, n in state.domain_in_flight.items() if n},
            domain_recent={d: list(r) for d, r in state.domain_recent.items() if r},
            proxies=list(state.proxies.values()),
            plans=dict(state.plans),
            external_jobs=dict(state.external_jobs),
        )
    )


def decode(data: bytes) -> DispatchState | None:
    """The state a snapshot holds, or ``None`` when it is not one this code can trust."""
    try:
        if _header.decode(data).format != SNAPSHOT_FORMAT:
            return None
        snap = _decoder.decode(data)
    except msgspec.DecodeError:  # ValidationError included
        return None
    state = DispatchState(position=snap.position)
    try:
        for record in snap.jobs:
            state.jobs[record.job.job_id] = _plan(record)
    except (IndexError, KeyError):
        return None
    state.consents = {c.domain: c for c in snap.consents}
    state.proxies = {p.proxy_id: p for p in snap.proxies}
    state.plans = dict(snap.plans)
    state.external_jobs = dict(snap.external_jobs)
    state.domain_in_flight = Counter(snap.domain_in_flight)
    state.domain_recent = {d: deque(r) for d, r in snap.domain_recent.items()}
    return state


def _plan(record: JobRecord) -> JobPlan:
    flows = {
        f.flow_id: FlowSlot(
            f.flow_id, f.target_index, f.host, f.flow, f.dispatched_at, f.item_seq, f.delivered_at
        )
        for f in record.flows
    }
    # in-flight flows oldest first (in the order their work items were stored), as the
    # stall check scans them
    flying = sorted(
        (s for s in flows.values() if s.status == FlowStatus.IN_FLIGHT),
        key=lambda s: s.item_seq,
    )
    return JobPlan(
        job=record.job,
        created_seq=record.created_seq,
        hosts=tuple(record.hosts),
        flows=flows,
        queue=deque(record.flows[n].flow_id for n in record.queue),
        flying={s.flow_id: None for s in flying},
        done=record.done,
        failed=record.failed,
        broken=record.broken,
    )


@dataclass
class SnapshotStore:
    """The snapshot's home: one object in the ``tb_dispatcher`` object store."""

    bus: Bus
    name: str = SNAPSHOT_OBJECT
    load_timeout: float = 10.0

    async def load(self) -> bytes | None:
        """The stored bytes, or ``None`` when there are none or they cannot be fetched."""
        try:
            store = await self.bus.js.object_store(subjects.DISPATCHER_BUCKET)
            # a meta entry whose chunks are gone would otherwise wait for them forever
            async with asyncio.timeout(self.load_timeout):
                result = await store.get(self.name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as err:  # no bucket, a bad digest, slow
            log.warning("dispatcher.snapshot.unreadable", error=repr(err))
            return None
        return bytes(result.data or b"")

    async def save(self, data: bytes) -> None:
        store = await self.bus.js.object_store(subjects.DISPATCHER_BUCKET)
        await store.put(self.name, data)
