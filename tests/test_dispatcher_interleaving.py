"""A tick against a world that moves on at every await: cancels, pauses, outcomes, revocations.

The dispatcher's only port is the ``Bus``; here it is an in-memory log with
JetStream's two rules that matter (the expected last subject sequence, msg-id dedupe),
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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.bus import Appended, Batch, BusConfig, ConcurrencyConflict, Expect
from engine.dispatch.state import DispatchState, FlowStatus
from engine.dispatcher import Dispatcher
from engine.jobs.decider import TERMINAL, Job, JobStatus, evolve
from schemas import subjects
from schemas.consent_state import Consent, evolve_consent
from schemas.events import (
    CONSENT_REVOKED,
    ConsentGiven,
    ConsentRevoked,
    Envelope,
    Event,
    FlowDispatched,
    FlowDone,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    JobCancelled,
    JobCompleted,
    JobCreated,
    JobEvent,
    JobFailed,
    JobPaused,
    JobResumed,
    TbEvent,
)
from schemas.flow_lifecycle import FlowProgress, FlowState, flow_transition
from schemas.values import ConsentCaps, JobSettings, Target
from tests.test_dispatch_state import NOW

HOSTS = ("a.test", "b.test")
HAPPENINGS = (
    "create", "cancel", "pause", "resume", "done", "fail", "fatal", "release", "revoke",
    "renew", "later",
)  # fmt: skip
OUTCOMES = (FlowDone, FlowFailed, FlowStalled, FlowReleased)


@dataclass
class MemoryLog:
    """The events stream: sequences, the expected-last-sequence check, msg-id dedupe."""

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
        subject = subjects.subject_for(event)
        self.entries.append(Envelope(seq=seq, subject=subject, event=event))  # type: ignore[arg-type]
        self.ids[msg_id] = seq
        return Appended(seq=seq, duplicate=False)

    def events(self) -> list[TbEvent]:
        return [e.event for e in self.entries]

    def job(self, job_id: str) -> Job:
        job = Job()
        for env in self.entries:
            if isinstance(env.event, JobEvent) and env.event.job_id == job_id:
                job = evolve(job, env.event, env.seq)
        return job

    def consent(self, host: str) -> Consent:
        consent = Consent(domain=host)
        for env in self.entries:
            consent = evolve_consent(consent, env.event, env.seq)
        return consent if consent.domain == host else Consent(domain=host)

    def in_flight(self) -> list[FlowDispatched]:
        """Work items whose attempt has no end yet, of jobs not cancelled."""
        items: dict[str, FlowDispatched] = {}
        for e in self.events():
            if isinstance(e, FlowDispatched):
                items[e.flow_id] = e
            elif isinstance(e, OUTCOMES):
                item = items.get(e.flow_id)
                if item is not None and item.attempt == e.attempt:
                    del items[e.flow_id]
        return [i for i in items.values() if self.job(i.job_id).status != JobStatus.CANCELLED]


class World:
    """Everything but the dispatcher: API users, runners, consent owners, the clock, the reader."""

    def __init__(self, data: st.DataObject | None) -> None:
        self.data = data
        self.log = MemoryLog()
        self.now = NOW
        self.delivered = 0
        self.dispatcher: Dispatcher | None = None
        self.jobs = 0
        for host in HOSTS:
            self.renew(host)
        for _ in range(2):
            self.create()

    def event(self, kind: type[Any], **fields: Any) -> Any:
        return kind(id="x", at=self.now, actor="world", **fields)

    def append(self, event: Event) -> None:
        self.log.store(event, f"world:{len(self.log.entries)}")

    def renew(self, host: str) -> None:
        expires = self.now + timedelta(days=1)
        caps = ConsentCaps(max_concurrent=3)
        given = self.event(ConsentGiven, domain=host, evidence="e", expires_at=expires, caps=caps)
        self.append(given)

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
            self.dispatcher.reader.deliver(Batch(batch, batch[-1].seq, []))

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
        job = self.log.job(job_id)
        flows = self.log.in_flight()
        if kind == "create" and self.jobs < 5:
            self.create()
        elif kind == "cancel" and job.status not in TERMINAL:
            self.append(self.event(JobCancelled, job_id=job_id, reason="user"))
        elif kind == "pause" and job.status == JobStatus.RUNNING:
            self.append(self.event(JobPaused, job_id=job_id, reason="user"))
        elif kind == "resume" and job.status == JobStatus.PAUSED:
            if all(self.log.consent(h).valid_at(self.now) for h in job.hosts):
                self.append(self.event(JobResumed, job_id=job_id))  # as JobCommands.resume
        elif kind in ("done", "fail", "fatal", "release") and flows:
            item = flows[pick % len(flows)]
            common = {
                "job_id": item.job_id, "flow_id": item.flow_id, "attempt": item.attempt,
                "target_index": item.target_index,
            }  # fmt: skip
            if kind == "done":
                self.append(self.event(FlowDone, runner_id="r", **common))
            elif kind == "release":  # a runner gives it back unrun (its job is paused)
                self.append(self.event(FlowReleased, runner_id="r", reason="paused", **common))
            else:  # a runner lost (retryable) or a flow that cannot work (fatal)
                self.append(self.event(FlowFailed, reason=kind, retryable=kind == "fail", **common))
        elif kind == "revoke":
            self.append(self.event(ConsentRevoked, domain=HOSTS[pick % len(HOSTS)]))
        elif kind == "renew":
            self.renew(HOSTS[pick % len(HOSTS)])
        elif kind == "later":  # time passes: long enough for in-flight flows to stall
            self.now += timedelta(minutes=6)


class InterleavingBus:
    """The dispatcher's ``Bus``: at every await of a real append, the world may move on."""

    config = BusConfig()
    nc = None

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
            plan = state.jobs[event.job_id]
            assert plan.job.status == JobStatus.RUNNING, f"{event.flow_id}: job not running"
            slot = plan.flows[event.flow_id]
            assert slot.status == FlowStatus.PLANNED and slot.attempt + 1 == event.attempt
            assert state.consents[slot.host].valid_at(self.world.now)
            assert set(event.allowed_hosts) <= state.authorised_hosts(self.world.now)
        acks = []
        for event, msg_id in items:
            self.world.step()
            acks.append(self.world.log.store(event, msg_id))
        self.world.step()
        return acks

    async def delivered_up_to(self, consumer: str) -> int | None:
        """The runners have taken every work item stored so far."""
        self.world.step()
        return len(self.world.log.entries)


def check_counts(state: DispatchState) -> None:
    """The state's counters agree with its flows, job by job and host by host."""
    in_flight_by_host: Counter[str] = Counter()
    for plan in state.jobs.values():
        slots = Counter(slot.status for slot in plan.flows.values())
        assert plan.in_flight == slots[FlowStatus.IN_FLIGHT]
        assert (plan.done, plan.failed) == (slots[FlowStatus.DONE], slots[FlowStatus.FAILED])
        planned = [s.flow_id for s in plan.flows.values() if s.status == FlowStatus.PLANNED]
        assert sorted(plan.queue) == sorted(planned)
        assert plan.in_flight <= plan.job.settings.instance_count
        for slot in plan.flows.values():
            if slot.status == FlowStatus.IN_FLIGHT:
                in_flight_by_host[slot.host] += 1
    for host in HOSTS:
        assert state.domain_in_flight[host] == in_flight_by_host[host]


def lifecycle_counts(log: MemoryLog, job_id: str, until: int) -> tuple[int, int]:
    """The job's counts by the flow rule, folded straight from the log up to ``until``."""
    flows: dict[str, FlowState | None] = {}
    done = failed = 0
    max_attempts = log.job(job_id).settings.max_attempts
    for env in log.entries[: until - 1]:
        e = env.event
        if isinstance(e, FlowProgress) and e.job_id == job_id:
            step = flow_transition(flows.get(e.flow_id), e, max_attempts=max_attempts)
            flows[e.flow_id] = step.state
            done, failed = done + step.done, failed + step.failed
    return done, failed


def check_log(log: MemoryLog) -> None:
    """What the dispatcher stored adds up: each work item sent once, finished counts exact."""
    sent = [msg_id for msg_id in log.published if msg_id.startswith("dispatch:")]
    assert all(log.published[msg_id] == 1 for msg_id in sent)
    for env in log.entries:
        e = env.event
        if isinstance(e, JobCompleted | JobFailed):
            total = sum(t.flows for t in log.job(e.job_id).targets)
            assert e.flows_done + e.flows_failed == total
            assert (e.flows_done, e.flows_failed) == lifecycle_counts(log, e.job_id, env.seq)
        if isinstance(e, FlowFailed) and e.actor == "system":
            assert e.reason == CONSENT_REVOKED and not e.retryable
            host = log.job(e.job_id).targets[e.target_index].url.split("/")[2]
            assert any(
                isinstance(r.event, ConsentRevoked) and r.event.domain == host
                for r in log.entries[: env.seq - 1]
            )
        if isinstance(e, JobPaused) and e.actor == "system":
            assert e.reason.startswith("consent revoked for ")


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_tick_acts_on_the_state_as_it_is_whatever_happens_meanwhile(data: st.DataObject) -> None:
    world = World(data)
    bus = InterleavingBus(world)
    dispatcher = Dispatcher(bus, clock=lambda: world.now)  # type: ignore[arg-type]
    world.dispatcher = dispatcher

    async def scenario() -> None:
        world.deliver()
        for _ in range(data.draw(st.integers(1, 12))):
            world.step()
            await dispatcher.tick()  # raises if it acts on a state that moved on
            world.deliver()
            check_counts(dispatcher.state)
            assert dispatcher.state.errors == []

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
    dispatcher = Dispatcher(bus, clock=lambda: world.now)  # type: ignore[arg-type]
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
    cancelled = next(e.seq for e in world.log.entries if isinstance(e.event, JobCancelled))
    late = [
        e.event
        for e in world.log.entries
        if isinstance(e.event, FlowDispatched) and e.event.job_id == "j1" and e.seq > cancelled
    ]
    assert late == []
    assert bus.items_checked > 0
