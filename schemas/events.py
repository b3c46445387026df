"""Every state change is one of these events; the union is the log's schema.

Schema evolution: new fields get defaults and existing field types never change.
A breaking change bumps ``v`` and adds an upcaster in ``decode_event``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.values import ConsentCaps, JobSettings, Platform, Target


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """Envelope fields every event carries; ``type`` is the class name."""

    id: str  # UUIDv7: time-ordered
    at: datetime  # UTC
    actor: str  # user, runner id or "system"
    v: int = 1


# -- jobs ---------------------------------------------------------------------------


class JobEvent(Event, frozen=True, kw_only=True):
    job_id: str


class JobCreated(JobEvent, frozen=True, kw_only=True):
    name: str
    targets: list[Target]
    settings: JobSettings
    platform: Platform = Platform()


class JobApprovalRequested(JobEvent, frozen=True, kw_only=True):
    reason: str = ""


class JobApproved(JobEvent, frozen=True, kw_only=True):
    pass


class JobRejected(JobEvent, frozen=True, kw_only=True):
    reason: str = ""


class JobRefused(JobEvent, frozen=True, kw_only=True):
    """The engine would not start the job; ``hosts`` names the unauthorised ones."""

    reason: str
    hosts: list[str] = []


class JobStarted(JobEvent, frozen=True, kw_only=True):
    flows_total: int
    allowed_hosts: list[str]


class JobPaused(JobEvent, frozen=True, kw_only=True):
    pass


class JobResumed(JobEvent, frozen=True, kw_only=True):
    pass


class JobCancelled(JobEvent, frozen=True, kw_only=True):
    reason: str = ""


class JobCompleted(JobEvent, frozen=True, kw_only=True):
    flows_done: int
    flows_failed: int


class JobFailed(JobEvent, frozen=True, kw_only=True):
    reason: str
    flows_done: int = 0
    flows_failed: int = 0


# -- flows --------------------------------------------------------------------------


class FlowEvent(Event, frozen=True, kw_only=True):
    job_id: str
    flow_id: str
    attempt: int


class FlowDispatched(FlowEvent, frozen=True, kw_only=True):
    """The work item a runner pulls from ``tb.dispatch.<os>.<browser>``."""

    target_index: int
    url: str
    clicks: int
    session_seconds: float
    allowed_hosts: list[str]
    seed: int
    platform: Platform = Platform()
    referrer: str | None = None


class FlowStarted(FlowEvent, frozen=True, kw_only=True):
    runner_id: str


class PageVisited(FlowEvent, frozen=True, kw_only=True):
    url: str
    status: int | None = None
    n: int = 0


class ClickDone(FlowEvent, frozen=True, kw_only=True):
    target_index: int
    href: str
    n: int = 0


class ClickSkipped(FlowEvent, frozen=True, kw_only=True):
    """A link or navigation to a host outside the authorised set: recorded, never followed."""

    href: str
    reason: str
    n: int = 0


class FlowDone(FlowEvent, frozen=True, kw_only=True):
    runner_id: str
    target_index: int
    clicks_done: int = 0
    duration_ms: int = 0


class FlowFailed(FlowEvent, frozen=True, kw_only=True):
    target_index: int
    reason: str
    retryable: bool = True
    runner_id: str = ""
    screenshot: str | None = None  # object-store name


class ProxyFailed(FlowEvent, frozen=True, kw_only=True):
    proxy: str
    reason: str
    n: int = 0


# -- runners ------------------------------------------------------------------------


class RunnerEvent(Event, frozen=True, kw_only=True):
    runner_id: str


class RunnerRegistered(RunnerEvent, frozen=True, kw_only=True):
    platform: Platform
    slots: int
    hostname: str = ""
    version: str = ""


class RunnerDraining(RunnerEvent, frozen=True, kw_only=True):
    pass


class RunnerDeregistered(RunnerEvent, frozen=True, kw_only=True):
    reason: str = ""


# -- consent ------------------------------------------------------------------------


class ConsentEvent(Event, frozen=True, kw_only=True):
    domain: str


class DomainClaimed(ConsentEvent, frozen=True, kw_only=True):
    """The token is not a secret: the owner publishes it to prove control of the domain."""

    token: str


class ConsentGiven(ConsentEvent, frozen=True, kw_only=True):
    method: Literal["well-known", "dns"] = "well-known"
    evidence: str  # the URL (or record) that served the token
    expires_at: datetime
    caps: ConsentCaps = ConsentCaps()


class ConsentVerificationFailed(ConsentEvent, frozen=True, kw_only=True):
    reason: str


class ConsentRevoked(ConsentEvent, frozen=True, kw_only=True):
    reason: str = ""


JobEvents = (
    JobCreated
    | JobApprovalRequested
    | JobApproved
    | JobRejected
    | JobRefused
    | JobStarted
    | JobPaused
    | JobResumed
    | JobCancelled
    | JobCompleted
    | JobFailed
)
FlowEvents = (
    FlowDispatched
    | FlowStarted
    | PageVisited
    | ClickDone
    | ClickSkipped
    | FlowDone
    | FlowFailed
    | ProxyFailed
)
RunnerEvents = RunnerRegistered | RunnerDraining | RunnerDeregistered
ConsentEvents = DomainClaimed | ConsentGiven | ConsentVerificationFailed | ConsentRevoked

TbEvent = JobEvents | FlowEvents | RunnerEvents | ConsentEvents

_decoder = msgspec.json.Decoder(TbEvent)
_encoder = msgspec.json.Encoder()


def decode_event(data: bytes) -> TbEvent:
    """Decode one event; raises ``msgspec.ValidationError`` for bytes that are not one."""
    event: TbEvent = _decoder.decode(data)
    return event


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


class Envelope(msgspec.Struct, frozen=True):
    """An event as stored: its stream sequence is the projections' checkpoint."""

    seq: int
    subject: str
    event: TbEvent


def event_schema() -> dict[str, object]:
    """JSON Schema of every event, for auditors (``tb schema``)."""
    (schema,), components = msgspec.json.schema_components([TbEvent])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "TrafficBuster events",
        **schema,
        "$defs": components,
    }
