"""What each NATS user may publish and subscribe to: pure functions, one per kind of user.

nats-server checks every publish (JetStream API calls are publishes too) and every
subscription against these lists; a deny wins over an allow, and what no allow names
is denied. Subjects here follow what the code does today (``engine.bus``,
``engine.puller``, ``agents``), so a runner's list is exactly a runner's work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from schemas import subjects
from schemas.events import RunnerEvents
from schemas.values import BrowserName, OsName

JS_API = "$JS.API"
EVENT_STREAMS = (
    subjects.EVENTS_STREAM,
    subjects.LOGS_STREAM,
    subjects.QUARANTINE_STREAM,
    subjects.ADVISORIES_STREAM,
)


@dataclass(frozen=True)
class Permissions:
    """One user's allow and deny lists (``None``: that direction is not restricted)."""

    publish_allow: list[str] | None = None
    publish_deny: list[str] = field(default_factory=list)
    subscribe_allow: list[str] | None = None
    subscribe_deny: list[str] = field(default_factory=list)

    def as_config(self) -> dict[str, object]:
        """The ``permissions`` block of a user in a nats-server configuration."""
        config: dict[str, object] = {}
        for direction, allow, deny in (
            ("publish", self.publish_allow, self.publish_deny),
            ("subscribe", self.subscribe_allow, self.subscribe_deny),
        ):
            block: dict[str, list[str]] = {}
            if allow is not None:
                block["allow"] = allow
            if deny:
                block["deny"] = deny
            if block:
                config[direction] = block
        return config


def all_dispatch_consumers() -> list[str]:
    """Every platform's shared durable (the work queues runners pull from)."""
    return [
        subjects.dispatch_consumer(os, browser)
        for os in get_args(OsName)
        for browser in get_args(BrowserName)
    ]


def durable_consumers() -> list[str]:
    """Durable consumers of the events stream nobody but the engine may create or change."""
    from engine.advisories import CONSUMER as EXHAUSTED

    return [*all_dispatch_consumers(), EXHAUSTED]


def full_access() -> Permissions:
    """The engine and the API: they provision streams and write every kind of event."""
    return Permissions()


def runner_inbox(runner_id: str) -> str:
    """The inbox prefix a runner connects with: its replies come to it alone."""
    return f"_INBOX.{runner_id}"


def runner(runner_id: str, os: str, browser: str) -> Permissions:
    """Exactly a runner's work, for the runner ``runner_id`` serving ``os``/``browser``.

    - events: its flows' events, its own lifecycle events (each type by name), log lines,
      and quarantine records of messages it could not read;
    - its own presence key; reads of the proxy-secret bucket; writes of screenshots;
    - its platform's dispatch consumer: next message, acks (ack, nak, in progress,
      term), info;
    - reading job-control and consent state: ephemeral consumers whose filter (in the
      API subject, nats-server 2.10+) is within ``tb.job.>`` or ``tb.consent.>``, and
      next-message requests on them;
    - replies on its own inbox only.
    """
    tb = subjects.EVENTS_STREAM
    durable = subjects.dispatch_consumer(os, browser)
    presence = f"KV_{subjects.RUNNERS_BUCKET}"
    secrets = f"KV_{subjects.PROXY_SECRETS_BUCKET}"
    shots = f"OBJ_{subjects.SCREENSHOTS_BUCKET}"
    own_events = [
        subjects.runner_subject(runner_id, kind.__name__) for kind in get_args(RunnerEvents)
    ]
    allow = [
        "tb.flow.>",
        *own_events,
        subjects.ALL_LOGS,
        *subjects.QUARANTINE_SUBJECTS,
        f"$KV.{subjects.RUNNERS_BUCKET}.{runner_id}",
        f"$O.{subjects.SCREENSHOTS_BUCKET}.>",
        f"{JS_API}.STREAM.INFO.{tb}",
        f"{JS_API}.STREAM.INFO.{presence}",
        f"{JS_API}.STREAM.INFO.{secrets}",
        f"{JS_API}.STREAM.INFO.{shots}",
        f"{JS_API}.DIRECT.GET.{secrets}.>",
        f"{JS_API}.STREAM.MSG.GET.{secrets}",
        f"{JS_API}.DIRECT.GET.{shots}.>",
        f"{JS_API}.STREAM.MSG.GET.{shots}",
        f"{JS_API}.CONSUMER.INFO.{tb}.{durable}",
        f"$JS.ACK.{tb}.{durable}.>",
        f"{JS_API}.CONSUMER.CREATE.{tb}.*.tb.job.>",
        f"{JS_API}.CONSUMER.CREATE.{tb}.*.tb.consent.>",
        f"{JS_API}.CONSUMER.MSG.NEXT.{tb}.*",  # its dispatch consumer and its readers
    ]
    others = [name for name in durable_consumers() if name != durable]
    deny = [
        *(f"{JS_API}.CONSUMER.MSG.NEXT.{tb}.{name}" for name in others),
        # a named create is also an update: never of a durable the engine owns
        *(f"{JS_API}.CONSUMER.CREATE.{tb}.{name}.>" for name in durable_consumers()),
    ]
    return Permissions(
        publish_allow=allow,
        publish_deny=deny,
        subscribe_allow=[f"{runner_inbox(runner_id)}.>"],
    )


def auditor() -> Permissions:
    """Reads the event streams through ordered or ephemeral consumers; changes nothing."""
    reads: list[str] = [f"{JS_API}.INFO", f"{JS_API}.STREAM.NAMES", f"{JS_API}.STREAM.LIST"]
    for stream in EVENT_STREAMS:
        reads += [
            f"{JS_API}.STREAM.INFO.{stream}",
            f"{JS_API}.STREAM.MSG.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>",
            f"{JS_API}.CONSUMER.CREATE.{stream}",
            f"{JS_API}.CONSUMER.CREATE.{stream}.>",
            f"{JS_API}.CONSUMER.INFO.{stream}.*",
            f"{JS_API}.CONSUMER.NAMES.{stream}",
            f"{JS_API}.CONSUMER.LIST.{stream}",
            f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        ]
    tb = subjects.EVENTS_STREAM
    return Permissions(
        publish_allow=[*reads, "$JS.FC.>"],  # flow-control replies of ordered consumers
        publish_deny=[
            "tb.>",
            *(f"{JS_API}.CONSUMER.CREATE.{tb}.{name}" for name in durable_consumers()),
            *(f"{JS_API}.CONSUMER.CREATE.{tb}.{name}.>" for name in durable_consumers()),
            *(f"{JS_API}.CONSUMER.MSG.NEXT.{tb}.{name}" for name in durable_consumers()),
        ],
        subscribe_allow=["_INBOX.>"],
    )


def ops() -> Permissions:
    """The ``nats`` CLI's stream and consumer administration: the JetStream API and inboxes."""
    return Permissions(
        publish_allow=[f"{JS_API}.>", "$JS.FC.>"],
        subscribe_allow=["_INBOX.>"],
    )
