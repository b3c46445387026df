"""A tick against a world that moves on at every await: cancels, pauses, outcomes, revocations.

The dispatcher's only port is the ``Bus``; here it is an in-memory log with
JetStream's two rules that matter (msg-id dedupe, expected last subject sequence),
and at every point where a real append would wait for the server, hypothesis picks
what the rest of the system does meanwhile and whether the reader delivers it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bus import Appended, ConcurrencyConflict, Expect
from engine.dispatch.state import Dispatch, DispatchState, FlowStatus
from engine.dispatcher import Dispatcher
from engine.jobs.decider import TERMINAL, Job, JobStatus, evolve
from schemas import subjects
from schemas.events import (
    ConsentGiven,
    ConsentRevoked,
    Envelope,
    Event,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobEvent,
    JobFailed,
    JobPaused,
    JobResumed,
)
from schemas.values import ConsentCaps, JobSettings, Target
from tests.test_dispatch_state import NOW

HOSTS = ("a.test", "b.test")
HAPPENINGS = ("create", "cancel", "pause", "resume", "done", "fail", "fatal", "revoke", "renew")


@dataclass
class MemoryLog:
    """The events stream: sequences, msg-id dedupe, and the expected-last-sequence check."""

    entries: list[Envelope] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    published: Counter[str] = field(default_factory=Counter)  # msg-ids sent, duplicates too

    def store(self, event: Event, msg_id: str, expect: Expect | None = None) -> Appended:
        self.published[msg_id] += 1
        if expect is not None:  # nats-server 2.15 checks this before the msg-id
            scope = expect.stream_filter.removesuffix("*")
            last = max((e.seq for e in self.entries if e.subject.startswith(scope)), default=0)
            if last != expect.last_seq:
                raise ConcurrencyConflict(expect.stream_filter, expect.last_seq)
        if msg_id in self.ids:
            return Appended(seq=self.ids[msg_id], duplicate=True)
        seq = len(self.entries) + 1
        self.entries.append(Envelope(seq=seq, subject=subjects.subject_for(event), event=event))  # type: ignore[arg-type]
        self.ids[msg_id] = seq
        return Appended(seq=seq, duplicate=False)

    def job(self, job_id: str) -> Job:
        job = Job()
        for env in self.entries:
            if isinstance(env.event, JobEvent) and env.event.job_id == job_id:
                job = evolve(job, env.event, env.seq)
        return job

    def in_flight(self) -> list[FlowDispatched]:
        """Work items whose attempt has no outcome yet, of jobs not cancelled."""
        items: dict[str, FlowDispatched] = {}
        for env in self.entries:
            e = env.event
            if isinstance(e, FlowDispatched):
                items[e.flow_id] = e
            elif isinstance(e, (FlowDone, FlowFailed)):
                item = items.get(e.flow_id)
                if item is not None and item.attempt == e.attempt:
                    del items[e.flow_id]
        return [i for i in items.values() if self.job(i.job_id).status != JobStatus.CANCELLED]


class World:
    """Everything but the dispatcher: API users, runners, consent owners, and the reader."""

    def __init__(self, data: st.DataObject | None) -> None:
        self.data = data
        self.log = MemoryLog()
        self.delivered = 0
        self.dispatcher: Dispatcher | None = None
        self.jobs = 0
        for host in HOSTS:
            self.renew(host)
        for _ in range(2):
            self.create()

    def event(self, kind: type[Any], **fields: Any) -> Any:
        return kind(id="x", at=NOW, actor="world", **fields)

    def append(self, event: Event) -> None:
        self.log.store(event, f"world:{len(self.log.entries)}")

    def renew(self, host: str) -> None:
        expires = NOW + timedelta(days=1)
        caps = ConsentCaps(max_concurrent=3)
        self.append(
            self.event(ConsentGiven, domain=host, evidence="e", expires_at=expires, caps=caps)
        )

    def create(self) -> None:
        self.jobs += 1
        job_id = f"j{self.jobs}"
        targets = [Target(url=f"http://{h}/", flows=2) for h in HOSTS[: 1 + self.jobs % 2]]
        settings = JobSettings(instance_count=2, max_attempts=2)
        self.append(
            self.event(JobCreated, job_id=job_id, name=job_id, targets=targets, settings=settings)
        )

    def deliver(self) -> None:
        """The reader catches up with the log."""
        assert self.dispatcher is not None
        batch = self.log.entries[self.delivered :]
        self.delivered = len(self.log.entries)
        if batch:
            self.dispatcher.reader.deliver(batch)

    def step(self) -> None:
        """Whatever the rest of the system does while the dispatcher waits."""
        if self.data is None:
            return
        for kind, pick in self.data.draw(
            st.lists(st.tuples(st.sampled_from(HAPPENINGS), st.integers(0, 20)), max_size=3)
        ):
            self.happen(kind, pick)
        if self.data.draw(st.booleans()):
            self.deliver()

    def happen(self, kind: str, pick: int) -> None:
        job_id = f"j{pick % self.jobs + 1}"
        status = self.log.job(job_id).status
        flows = self.log.in_flight()
        if kind == "create" and self.jobs < 5:
            self.create()
        elif kind == "cancel" and status not in TERMINAL:
            self.append(self.event(JobCancelled, job_id=job_id, reason="user"))
        elif kind == "pause" and status == JobStatus.RUNNING:
            self.append(self.event(JobPaused, job_id=job_id))
        elif kind == "resume" and status == JobStatus.PAUSED:
            self.append(self.event(JobResumed, job_id=job_id))
        elif kind in ("done", "fail", "fatal") and flows:
            item = flows[pick % len(flows)]
            common = {
                "job_id": item.job_id, "flow_id": item.flow_id, "attempt": item.attempt,
                "target_index": item.target_index,
            }  # fmt: skip
            if kind == "done":
                self.append(self.event(FlowDone, runner_id="r", **common))
            else:  # a runner lost (retryable) or a flow that cannot work (fatal)
                self.append(self.event(FlowFailed, reason=kind, retryable=kind == "fail", **common))
        elif kind == "revoke":
            self.append(self.event(ConsentRevoked, domain=HOSTS[pick % len(HOSTS)]))
        elif kind == "renew":
            self.renew(HOSTS[pick % len(HOSTS)])


class InterleavingBus:
    """The dispatcher's ``Bus``: at every await of a real append, the world may move on."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.items_checked = 0

    async def append(self, event: Event, *, msg_id: str, expect: Expect | None = None) -> Appended:
        self.world.step()  # others write before ours is stored…
        ack = self.world.log.store(event, msg_id, expect)
        self.world.step()  # …or after, before its ack is back
        return ack

    async def append_pipelined(self, items: Sequence[tuple[Event, str]]) -> list[Appended]:
        state = self.world.dispatcher.state if self.world.dispatcher else DispatchState()
        for event, _ in items:  # as built: each must hold on the state of now
            assert isinstance(event, FlowDispatched)
            self.items_checked += 1
            d = Dispatch(event.job_id, event.flow_id, event.attempt, event.target_index, 0)
            assert state.dispatchable(d, NOW), f"{event.flow_id} of a job not running"
            assert state.jobs[event.job_id].job.status == JobStatus.RUNNING
        acks = []
        for event, msg_id in items:
            self.world.step()
            acks.append(self.world.log.store(event, msg_id))
        self.world.step()
        return acks


def check_counts(state: DispatchState) -> None:
    in_flight_by_host: Counter[str] = Counter()
    for plan in state.jobs.values():
        slots = Counter(slot.status for slot in plan.flows.values())
        assert plan.in_flight == slots[FlowStatus.IN_FLIGHT]
        assert (plan.done, plan.failed) == (slots[FlowStatus.DONE], slots[FlowStatus.FAILED])
        assert sorted(plan.queue) == sorted(
            s.flow_id for s in plan.flows.values() if s.status == FlowStatus.PLANNED
        )
        assert plan.in_flight <= plan.job.settings.instance_count
        for slot in plan.flows.values():
            if slot.status == FlowStatus.IN_FLIGHT:
                in_flight_by_host[slot.host] += 1
    for host in HOSTS:
        assert state.domain_in_flight[host] == in_flight_by_host[host]


def check_log(log: MemoryLog) -> None:
    """What the dispatcher stored adds up: each work item sent once, finished counts exact."""
    sent = [msg_id for msg_id in log.published if msg_id.startswith("dispatch:")]
    assert all(log.published[msg_id] == 1 for msg_id in sent)
    done: dict[str, set[str]] = {}
    for env in log.entries:
        e = env.event
        if isinstance(e, FlowDone):
            done.setdefault(e.job_id, set()).add(e.flow_id)
        if isinstance(e, (JobCompleted, JobFailed)):
            total = sum(t.flows for t in log.job(e.job_id).targets)
            assert e.flows_done + e.flows_failed == total
            assert e.flows_done == len(done.get(e.job_id, set()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_tick_acts_on_the_state_as_it_is_whatever_happens_meanwhile(data: st.DataObject) -> None:
    world = World(data)
    bus = InterleavingBus(world)
    dispatcher = Dispatcher(bus, clock=lambda: NOW)  # type: ignore[arg-type]
    world.dispatcher = dispatcher

    async def scenario() -> None:
        world.deliver()
        for _ in range(data.draw(st.integers(1, 10))):
            world.step()
            await dispatcher.tick()  # raises if it acts on a state that moved on
            world.deliver()
            check_counts(dispatcher.state)

    asyncio.run(scenario())
    check_log(world.log)


class CancelWhileStarting(InterleavingBus):
    """While a job's start is appended, a user cancels the other job and the reader sees it."""

    cancel: str | None = None

    async def append(self, event: Event, *, msg_id: str, expect: Expect | None = None) -> Appended:
        ack = self.world.log.store(event, msg_id, expect)
        if self.cancel is not None:
            self.world.append(self.world.event(JobCancelled, job_id=self.cancel, reason="user"))
            self.world.deliver()
        return ack


async def test_a_cancel_while_another_job_starts_leaves_no_dispatch_for_it() -> None:
    world = World(None)
    bus = CancelWhileStarting(world)
    dispatcher = Dispatcher(bus, clock=lambda: NOW)  # type: ignore[arg-type]
    world.dispatcher = dispatcher
    world.deliver()
    await dispatcher.tick()  # j1 and j2 start, and dispatch
    world.deliver()
    world.create()  # j3: the next tick starts it, then dispatches what is queued
    world.deliver()
    bus.cancel = "j1"
    await dispatcher.tick()
    world.deliver()
    check_counts(dispatcher.state)
    late = [
        e.event
        for e in world.log.entries
        if isinstance(e.event, FlowDispatched)
        and e.event.job_id == "j1"
        and e.seq > next(x.seq for x in world.log.entries if isinstance(x.event, JobCancelled))
    ]
    assert late == []
    assert bus.items_checked > 0
