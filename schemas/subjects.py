"""Every subject, stream, bucket and message-id is spelled here and nowhere else."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from schemas.events import (
    ConsentEvent,
    DatasetEvent,
    DeviceCatalogueAdopted,
    Event,
    FlowDispatched,
    FlowDone,
    FlowEvent,
    FlowFailed,
    FlowReleased,
    FlowStalled,
    JobEvent,
    LicenseAssigned,
    ProxyEvent,
    ProxyFailed,
    RunnerEvent,
    RunnerKeyEvent,
    UserEvent,
)

EVENTS_STREAM = "TB"
LOGS_STREAM = "TB_LOGS"
ADVISORIES_STREAM = "TB_ADVISORIES"
QUARANTINE_STREAM = "TB_QUARANTINE"

EVENT_SUBJECTS = [
    "tb.job.>",
    "tb.dispatch.>",
    "tb.flow.>",
    "tb.runner.>",
    "tb.consent.>",
    "tb.dataset.>",
    "tb.schedule.>",
    "tb.user.>",
    "tb.proxy.>",
    "tb.runnerkey.>",
    "tb.catalogue.>",
]
ALL_LOGS = "tb.log.>"
LOG_SUBJECTS = [ALL_LOGS]
QUARANTINE_SUBJECTS = ["tb.quarantine.>"]

RUNNERS_BUCKET = "tb_runners"
LEASES_BUCKET = "tb_leases"
DATASETS_BUCKET = "tb_datasets"
DISPATCHER_BUCKET = "tb_dispatcher"  # the dispatcher's checkpointed state (a cache of the log)
RUNNER_KEYS_BUCKET = "tb_runner_keys"  # runner keys: hashes and NATS users, by key id
PROXY_SECRETS_BUCKET = "tb_proxy_secrets"  # proxy endpoints with credentials, by proxy id
SCREENSHOTS_BUCKET = "tb_screenshots"  # failure screenshots: the only bucket runners write
UPLOADS_BUCKET = "tb_uploads"  # chunked uploads in progress: a KV entry and chunk objects each
LOGS_BUCKET = "tb_logs"  # the saved log of each finished job (TB_LOGS ages out)

TYPE_HEADER = "Tb-Type"
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"


def domain_token(domain: str) -> str:
    """A domain as one subject token: dots become underscores (hostnames never hold ``_``)."""
    return domain.lower().replace(".", "_")


def token_domain(token: str) -> str:
    return token.replace("_", ".")


def job_subject(job_id: str, event_type: str) -> str:
    return f"tb.job.{job_id}.{event_type}"


def job_of_subject(subject: str) -> tuple[str, str] | None:
    """``(job id, event type)`` of a ``tb.job.<job_id>.<type>`` subject, else ``None``."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "tb" or parts[1] != "job":
        return None
    return parts[2], parts[3]


def job_stream_filter(job_id: str) -> str:
    """All events of one job aggregate (the optimistic-concurrency scope)."""
    return f"tb.job.{job_id}.*"


def dispatch_subject(os: str, browser: str) -> str:
    return f"tb.dispatch.{os}.{browser}"


def dispatch_platform(subject: str) -> tuple[str, str] | None:
    """``(os, browser)`` of a ``tb.dispatch.<os>.<browser>`` subject, else ``None``."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["tb", "dispatch"]:
        return None
    return parts[2], parts[3]


def dispatch_consumer(os: str, browser: str) -> str:
    """The one shared durable pull consumer of a platform's work queue."""
    return f"dispatch_{os}_{browser}"


def flow_subject(job_id: str, event_type: str) -> str:
    return f"tb.flow.{job_id}.{event_type}"


def runner_subject(runner_id: str, event_type: str) -> str:
    return f"tb.runner.{runner_id}.{event_type}"


def consent_subject(domain: str, event_type: str) -> str:
    return f"tb.consent.{domain_token(domain)}.{event_type}"


def consent_stream_filter(domain: str) -> str:
    return f"tb.consent.{domain_token(domain)}.*"


def log_subject(job_id: str) -> str:
    return f"tb.log.{job_id}"


def runner_log_key(flow_id: str, attempt: int, delivery: int, what: str) -> str:
    """Names a runner's line about one delivery of one work item (``received``, ``done``,
    …): a redelivery is a new delivery, and its lines are new lines."""
    return f"{flow_id}:{attempt}:{delivery}:{what}"


def runner_log_msg_id(job_id: str, keys: Sequence[str]) -> str:
    """The lines a runner sends together, named by their keys (``runner_log_key``): the
    same lines sent twice are stored once."""
    digest = hashlib.blake2b("\n".join(keys).encode(), digest_size=16).hexdigest()
    return f"log:{job_id}:{digest}"


def ingest_log_msg_id(job_id: str, key: str) -> str:
    """A posted line that names itself (``Idempotency-Key``): a retried post is stored once."""
    return f"log:{job_id}:{key}"


def saved_log_name(job_id: str) -> str:
    """The object in ``tb_logs`` holding a finished job's log, one JSON line per line."""
    return f"{job_id}.jsonl"


def all_jobs(event_type: str = "*") -> str:
    return job_subject("*", event_type)


def all_flows(event_type: str = "*") -> str:
    return flow_subject("*", event_type)


def all_consents(event_type: str = "*") -> str:
    return f"tb.consent.*.{event_type}"


def proxy_subject(proxy_id: str, event_type: str) -> str:
    return f"tb.proxy.{proxy_id}.{event_type}"


def proxy_stream_filter(proxy_id: str) -> str:
    """All events of one proxy (the optimistic-concurrency scope of its health)."""
    return f"tb.proxy.{proxy_id}.*"


def proxy_health_msg_id(proxy_id: str, event_type: str, episode: int, n: int = 0) -> str:
    """``proxy:<id>:<type>:<episode>:<n>``: the ``episode``-th time the proxy was marked bad,
    and its ``n``-th failed check; two engines deciding the same step write the same id."""
    return f"proxy:{proxy_id}:{event_type}:{episode}:{n}"


def user_subject(user_id: str, event_type: str) -> str:
    return f"tb.user.{user_id}.{event_type}"


def user_stream_filter(user_id: str) -> str:
    return f"tb.user.{user_id}.*"


def all_users(event_type: str = "*") -> str:
    return f"tb.user.*.{event_type}"


def runner_key_subject(key_id: str, event_type: str) -> str:
    return f"tb.runnerkey.{key_id}.{event_type}"


def runner_key_stream_filter(key_id: str) -> str:
    return f"tb.runnerkey.{key_id}.*"


def dataset_subject(dataset_id: str, event_type: str) -> str:
    return f"tb.dataset.{dataset_id}.{event_type}"


def dataset_stream_filter(dataset_id: str) -> str:
    """All events of one dataset (the optimistic-concurrency scope)."""
    return f"tb.dataset.{dataset_id}.*"


def dataset_object_name(dataset_id: str, sha256: str) -> str:
    """A version's rows in ``tb_datasets``, named by their dataset and content: a dataset
    stores one content once, and its objects go with it (``dataset_of_object``)."""
    return f"rows/{dataset_id}/{sha256}.jsonl"


def dataset_of_object(object_name: str) -> str | None:
    """The dataset an object in ``tb_datasets`` was stored for; ``None`` for one named by
    its content alone (``rows/<sha256>.jsonl``, stored before objects were named per
    dataset: several datasets may name it)."""
    parts = object_name.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "rows" and parts[1] else None


def device_catalogue_subject(event_type: str) -> str:
    return f"tb.catalogue.devices.{event_type}"


DEVICE_CATALOGUE = device_catalogue_subject("*")  # the optimistic-concurrency scope


def device_catalogue_msg_id(version: int) -> str:
    """Adopting a version is one fact however many engines or admins ask for it at once:
    they all write this id (and only a newer version is ever adopted after it)."""
    return f"catalogue:devices:{version}"


def upload_chunk_name(upload_id: str, index: int) -> str:
    """One chunk of an upload in progress, in the ``tb_uploads`` object store."""
    return f"{upload_id}/{index}"


ALL_PROXIES = "tb.proxy.>"
ALL_DATASETS = "tb.dataset.>"
ALL_PROXY_FAILURES = all_flows(ProxyFailed.__name__)
ALL_DISPATCH = "tb.dispatch.>"

# only what planning folds in: FlowStarted, PageVisited, clicks… never change the plan,
# and reading them would add a third message (or more) per flow
DISPATCHER_INPUTS = [
    "tb.job.>",
    ALL_DISPATCH,
    *(all_flows(kind.__name__) for kind in (FlowDone, FlowFailed, FlowStalled, FlowReleased)),
    "tb.consent.>",
    ALL_PROXIES,  # which proxies may be handed out
    all_users(LicenseAssigned.__name__),  # whose plan allows which job: no other user event
]


def subject_for(event: Event) -> str:
    """The subject an event is stored on, derived from its type and aggregate id."""
    return _subject_of(type(event))(event)


# how each event class makes its subject, found once per class: every event read is
# checked against its subject, and isinstance down the chain costs more than the rest
@functools.cache
def _subject_of(kind: type[Event]) -> Callable[[Any], str]:
    name = kind.__name__
    if issubclass(kind, FlowDispatched):
        return lambda event: dispatch_subject(event.platform.os, event.platform.browser)
    if issubclass(kind, FlowEvent):
        return lambda event: flow_subject(event.job_id, name)
    if issubclass(kind, JobEvent):
        return lambda event: job_subject(event.job_id, name)
    if issubclass(kind, RunnerEvent):
        return lambda event: runner_subject(event.runner_id, name)
    if issubclass(kind, ConsentEvent):
        return lambda event: consent_subject(event.domain, name)
    if issubclass(kind, ProxyEvent):
        return lambda event: proxy_subject(event.proxy_id, name)
    if issubclass(kind, UserEvent):
        return lambda event: user_subject(event.user_id, name)
    if issubclass(kind, RunnerKeyEvent):
        return lambda event: runner_key_subject(event.key_id, name)
    if issubclass(kind, DatasetEvent):
        return lambda event: dataset_subject(event.dataset_id, name)
    if issubclass(kind, DeviceCatalogueAdopted):
        return lambda event: device_catalogue_subject(name)
    raise TypeError(f"no subject for {name}")


def dispatch_msg_id(flow_id: str, attempt: int) -> str:
    return f"dispatch:{flow_id}:{attempt}"


def flow_msg_id(event: FlowEvent, n: int = 0) -> str:
    """``<flow_id>:<attempt>:<type>:<n>``: a runner retrying a publish is deduplicated."""
    return f"{event.flow_id}:{event.attempt}:{type(event).__name__}:{n}"


def exhausted_msg_id(flow_id: str, attempt: int) -> str:
    return f"{flow_id}:{attempt}:FlowFailed:exhausted"


def command_msg_id(command_id: str, n: int = 0) -> str:
    """The ``n``-th event one command decided: a retry of the command dedupes, while a
    different command at the same version stays different and meets the concurrency check
    (nats-server checks ``Nats-Msg-Id`` before the expected sequence)."""
    return f"cmd:{command_id}:{n}"


def revoked_msg_id(flow_id: str, attempt: int) -> str:
    """FlowFailed(consent revoked): the dispatcher and the runner write the same id."""
    return f"{flow_id}:{attempt}:FlowFailed:revoked"


def stalled_msg_id(flow_id: str, attempt: int) -> str:
    return f"{flow_id}:{attempt}:FlowStalled:0"


def released_msg_id(flow_id: str, attempt: int, delivery: int) -> str:
    return f"{flow_id}:{attempt}:FlowReleased:{delivery}"


def screenshot_name(flow_id: str, attempt: int, delivery: int) -> str:
    """The object holding the screenshot of one delivery of one attempt that failed."""
    return f"{flow_id}/{attempt}/{delivery}.png"


def quarantine_subject(stream: str, seq: int) -> str:
    return f"tb.quarantine.{stream}.{seq}"


def quarantine_msg_id(stream: str, seq: int) -> str:
    """Several readers finding one bad message record it once."""
    return f"quarantine:{stream}:{seq}"


def runner_msg_id(event: RunnerEvent) -> str:
    return f"runner:{event.runner_id}:{type(event).__name__}:{event.id}"


def max_deliveries_advisory(consumer: str) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{EVENTS_STREAM}.{consumer}"
