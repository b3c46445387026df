"""Every state change is one of these events; the union is the log's schema.

Schema evolution: new fields get defaults and existing field types never change.
A breaking change bumps ``v`` and adds an upcaster in ``decode_event``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.device_catalogue import CatalogueVersion, Version
from schemas.labels import Labels
from schemas.proxies import MAX_BYPASS, ProxyDns, normal_bypass_entry
from schemas.values import (
    Attempt,
    AwareDatetime,
    ConsentCaps,
    Count,
    Domain,
    HttpStatus,
    Id,
    Index,
    JobKind,
    JobSettings,
    Millis,
    Platform,
    ProxyLabel,
    Sha256,
    Target,
    Text,
    Url,
    UsedVersion,
    host_is_valid,
    url_problem,
)

Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Name = Annotated[str, msgspec.Meta(max_length=200)]
Hosts = Annotated[list[str], msgspec.Meta(max_length=10_000)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65_535)]
Ports = Annotated[list[Port], msgspec.Meta(max_length=64)]

CONSENT_REVOKED = "consent revoked"  # the FlowFailed reason when a host's consent is revoked


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """Envelope fields every event carries; ``type`` is the class name."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # UUIDv7: time-ordered
    at: AwareDatetime  # UTC
    actor: Actor  # user, runner id or "system"
    v: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


# -- jobs ---------------------------------------------------------------------------


class JobEvent(Event, frozen=True, kw_only=True):
    job_id: Id


class JobCreated(JobEvent, frozen=True, kw_only=True):
    """A job of ``kind`` ``flows`` has at least one target; an ``external`` one has none
    (its worker reports by log lines: ``JobProgressed``, then its end)."""

    name: Name
    targets: Annotated[list[Target], msgspec.Meta(max_length=10_000)]
    settings: JobSettings
    platform: Platform = Platform()
    kind: JobKind = "flows"
    # the dataset versions the job was made from, by kind (targets, proxies, devices, settings)
    datasets: dict[str, UsedVersion] = {}
    # the device catalogue its devices are resolved against (None: created before
    # catalogues had versions, which was version 1)
    device_catalogue: CatalogueVersion | None = None

    def __post_init__(self) -> None:
        if self.kind == "flows" and not self.targets:
            raise ValueError("targets: a job of flows needs at least one target")
        if self.kind == "external" and self.targets:
            raise ValueError("targets: an external job has none")


class JobApprovalRequested(JobEvent, frozen=True, kw_only=True):
    reason: Text = ""


class JobApproved(JobEvent, frozen=True, kw_only=True):
    pass


class JobRejected(JobEvent, frozen=True, kw_only=True):
    reason: Text = ""


class JobRefused(JobEvent, frozen=True, kw_only=True):
    """The engine would not start the job; ``hosts`` names the unauthorised ones."""

    reason: Text
    hosts: Hosts = []


class JobStarted(JobEvent, frozen=True, kw_only=True):
    flows_total: Count
    allowed_hosts: Hosts


class JobPaused(JobEvent, frozen=True, kw_only=True):
    reason: Text = ""


class JobResumed(JobEvent, frozen=True, kw_only=True):
    pass


class JobProgressed(JobEvent, frozen=True, kw_only=True):
    """An external job's worker said how far it got (``[INFO] Progress: N%``)."""

    percent: Annotated[int, msgspec.Meta(ge=0, le=100)]
    message: Text = ""


class JobCancelled(JobEvent, frozen=True, kw_only=True):
    reason: Text = ""


class JobCompleted(JobEvent, frozen=True, kw_only=True):
    flows_done: Count
    flows_failed: Count


class JobFailed(JobEvent, frozen=True, kw_only=True):
    reason: Text
    flows_done: Count = 0
    flows_failed: Count = 0


# -- flows --------------------------------------------------------------------------


class FlowEvent(Event, frozen=True, kw_only=True):
    """``attempt`` is the dispatcher's counter; ``delivery`` the JetStream delivery of the
    work item that a runner's event reports on (0 for the engine's own events)."""

    job_id: Id
    flow_id: Id
    attempt: Attempt
    delivery: Attempt = 0


class FlowDispatched(FlowEvent, frozen=True, kw_only=True):
    """The work item a runner pulls from ``tb.dispatch.<os>.<browser>``."""

    target_index: Index
    url: Url
    clicks: Annotated[int, msgspec.Meta(ge=0, le=1000)]
    session_seconds: Annotated[float, msgspec.Meta(ge=0, le=24 * 3600)]
    allowed_hosts: Hosts
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    platform: Platform = Platform()
    referrer: Annotated[str, msgspec.Meta(max_length=2048)] | None = None
    # the consented ports of each allowed host (empty in items dispatched before ports
    # were recorded: the runner then allows 80, 443 and the target URL's port)
    allowed_ports: dict[str, Ports] = {}
    # upstream proxy candidates by id, tried in this order (the next one when a proxy
    # fails); empty: the flow connects directly. Their endpoints and credentials are in
    # the proxy secrets bucket, never here.
    proxies: Annotated[list[Id], msgspec.Meta(max_length=1000)] = []
    # the job's settings, for the flow's behaviour (None: an item from before they rode along)
    settings: JobSettings | None = None
    # the catalogue the job's devices resolve against (None: the job names no device, or
    # the item is from before catalogues had versions: version 1)
    device_catalogue: CatalogueVersion | None = None

    def __post_init__(self) -> None:
        problem = url_problem(self.url)
        if problem is not None:
            raise ValueError(f"url {problem}")


class FlowStarted(FlowEvent, frozen=True, kw_only=True):
    runner_id: Actor


Ms = Annotated[float, msgspec.Meta(ge=0, le=24 * 3600 * 1000)]
TRAIL_LENGTH = 2000  # steps a PageLeft lists at most (a long stay lists its first ones)
Steps = Annotated[list[int], msgspec.Meta(max_length=TRAIL_LENGTH)]


class PageTimings(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the browser measured of a page, in milliseconds from the navigation's start
    (Navigation Timing, Paint Timing, web vitals); ``None``: not measurable (yet)."""

    ttfb_ms: Ms | None = None
    dom_content_loaded_ms: Ms | None = None
    load_ms: Ms | None = None
    fcp_ms: Ms | None = None
    lcp_ms: Ms | None = None
    cls: Annotated[float, msgspec.Meta(ge=0, le=1000)] | None = None
    inp_ms: Ms | None = None


class PageVisited(FlowEvent, frozen=True, kw_only=True):
    """A page the flow arrived on (after its load event, or a bounded wait for it)."""

    url: Text
    status: HttpStatus | None = None
    n: Index = 0
    timings: PageTimings | None = None


class PageLeft(FlowEvent, frozen=True, kw_only=True):
    """What a flow did on a page before it moved on (or ended): one event per page.

    ``scrolls``: the wheel's vertical deltas in order; ``pauses_ms``: the pause before
    each step (a scroll or a mouse move); ``moves``: the end point of each mouse path,
    ``[x, y]``; ``timings``: the page's web vitals when left (CLS and INP grow while a
    page is open)."""

    url: Text
    n: Index = 0
    dwell_ms: Millis = 0
    scrolls: Steps = []
    pauses_ms: Steps = []
    moves: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=TRAIL_LENGTH)] = []
    timings: PageTimings | None = None


class LinkPick(msgspec.Struct, frozen=True):
    """Which link a click took: ``index`` among ``candidates`` (the page's links of its
    kind, in page order); ``external``: a link to another consented host of the job."""

    index: Index
    candidates: Count
    external: bool = False


class ClickDone(FlowEvent, frozen=True, kw_only=True):
    target_index: Index
    href: Text
    n: Index = 0
    link: LinkPick | None = None


class ClickSkipped(FlowEvent, frozen=True, kw_only=True):
    """A link or navigation to a host outside the authorised set: recorded, never followed."""

    href: Text
    reason: Text
    n: Index = 0


class FlowDone(FlowEvent, frozen=True, kw_only=True):
    runner_id: Actor
    target_index: Index
    clicks_done: Count = 0
    duration_ms: Millis = 0
    device: Name | None = None  # the device profile the flow presented as
    delay_ms: Millis | None = None  # the traffic delay it waited before its first page


class FlowFailed(FlowEvent, frozen=True, kw_only=True):
    target_index: Index
    reason: Text
    retryable: bool = True
    runner_id: Annotated[str, msgspec.Meta(max_length=200)] = ""
    screenshot: Text | None = None  # object-store name


class FlowStalled(FlowEvent, frozen=True, kw_only=True):
    """The dispatcher saw no end of this attempt in time: the attempt counts as spent."""

    target_index: Index
    waited_seconds: Annotated[float, msgspec.Meta(ge=0)]


class FlowReleased(FlowEvent, frozen=True, kw_only=True):
    """A runner gave the work item back unrun (e.g. its job is paused): no attempt spent."""

    target_index: Index
    runner_id: Actor
    reason: Text


class ProxyFailed(FlowEvent, frozen=True, kw_only=True):
    """A connection of this flow through one of its proxy candidates failed because of the
    proxy; the flow went on with the next candidate. ``proxy`` is its label
    (``scheme://host:port``, never credentials), ``error`` the kind of failure
    (``schemas.proxies.ProxyErrorKind``), ``reason`` what happened."""

    proxy: Text
    reason: Text
    n: Index = 0
    proxy_id: Id | None = None
    error: Annotated[str, msgspec.Meta(max_length=32)] = ""


class EgressRefused(FlowEvent, frozen=True, kw_only=True):
    """The runner's egress proxy refused a connection the flow's browser asked for."""

    host: Text
    port: Annotated[int, msgspec.Meta(ge=0, le=65_535)]
    reason: Text  # e.g. "host not consented", "loopback address"
    request: Text  # what asked for it, as the proxy saw it: "CONNECT host:443", "GET http://…"
    n: Index = 0


# -- runners ------------------------------------------------------------------------


class RunnerEvent(Event, frozen=True, kw_only=True):
    runner_id: Id


class RunnerRegistered(RunnerEvent, frozen=True, kw_only=True):
    """``slots`` is the runner's capacity; ``browser_version`` what its launched browser
    reports ("" for a runner without a browser); ``labels`` the operator's ``key=value``s."""

    platform: Platform
    slots: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    hostname: Name = ""
    version: Name = ""
    browser_version: Name = ""
    labels: Labels = msgspec.field(default_factory=dict)


class RunnerDraining(RunnerEvent, frozen=True, kw_only=True):
    pass


class RunnerDeregistered(RunnerEvent, frozen=True, kw_only=True):
    reason: Text = ""


# -- proxies ------------------------------------------------------------------------


class ProxyEvent(Event, frozen=True, kw_only=True):
    proxy_id: Id


class ProxyRegistered(ProxyEvent, frozen=True, kw_only=True):
    """Where the proxy is and how flows use it: ``bypass`` lists the hosts its flows reach
    directly, ``dns`` says who resolves names (the runner, or the proxy). Its credentials
    (``has_credentials``) are in the proxy secrets bucket under its id, never in the log."""

    scheme: Literal["http", "https", "socks5"]
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    has_credentials: bool = False
    label: ProxyLabel | None = None
    bypass: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=253)]], msgspec.Meta(max_length=MAX_BYPASS)
    ] = []
    dns: ProxyDns = "local"

    def __post_init__(self) -> None:
        if not host_is_valid(self.host):
            raise ValueError("host must be a domain name or an IP address")
        for entry in self.bypass:
            normal_bypass_entry(entry)


class ProxyRetired(ProxyEvent, frozen=True, kw_only=True):
    reason: Text = ""


class ProxyMarkedBad(ProxyEvent, frozen=True, kw_only=True):
    """``failures`` ProxyFailed within ``window_seconds``: not handed out until a check
    after ``bad_until`` passes."""

    failures: Count
    window_seconds: Annotated[float, msgspec.Meta(ge=0)]
    bad_until: AwareDatetime
    reason: Text = ""  # the last failure's


class ProxyCheckFailed(ProxyEvent, frozen=True, kw_only=True):
    """The check after the cool-down failed: the cool-down is extended to ``bad_until``."""

    reason: Text
    bad_until: AwareDatetime


class ProxyRestored(ProxyEvent, frozen=True, kw_only=True):
    """The check passed: the proxy is handed out again."""

    check: Text = ""  # what the check did


# -- consent ------------------------------------------------------------------------


class ConsentEvent(Event, frozen=True, kw_only=True):
    domain: Domain


class DomainClaimed(ConsentEvent, frozen=True, kw_only=True):
    """The token is not a secret: the owner publishes it to prove control of the domain.

    ``caps``: the limits the claimant asks for (within the server's ceiling; ``None``: the
    defaults); ``include_subdomains``: the consent is to cover every subdomain too, which
    only a DNS verification can grant (control of the zone, not of one web server)."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    caps: ConsentCaps | None = None
    include_subdomains: bool = False


class ConsentGiven(ConsentEvent, frozen=True, kw_only=True):
    method: Literal["well-known", "dns"] = "well-known"
    evidence: Text  # the URL (or record) that served the token
    expires_at: AwareDatetime
    # when the token was found (``None`` in events recorded before it was: ``at``)
    verified_at: AwareDatetime | None = None
    # the consent covers every subdomain: claimed so, and verified by DNS
    include_subdomains: bool = False
    caps: ConsentCaps = ConsentCaps()
    # the ports flows may use on the domain: 80, 443 and the port it was verified on
    # (empty in events recorded before ports were: derived from ``evidence`` on read)
    ports: Ports = []


class ConsentVerificationFailed(ConsentEvent, frozen=True, kw_only=True):
    reason: Text


class ConsentRevoked(ConsentEvent, frozen=True, kw_only=True):
    reason: Text = ""


# -- users --------------------------------------------------------------------------
# Secrets never enter the log: password and key hashes live in the credentials bucket;
# these events say that a password changed or a key exists, never what they are.

Role = Literal["viewer", "operator", "admin"]
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
PlanName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
ClientAddress = Annotated[str, msgspec.Meta(max_length=100)]
SessionKind = Literal["interactive", "api_key"]


class UserEvent(Event, frozen=True, kw_only=True):
    user_id: Id


class UserCreated(UserEvent, frozen=True, kw_only=True):
    username: Username
    role: Role


class RoleChanged(UserEvent, frozen=True, kw_only=True):
    role: Role


class UserDisabled(UserEvent, frozen=True, kw_only=True):
    reason: Text = ""


class UserEnabled(UserEvent, frozen=True, kw_only=True):
    pass


class PasswordChanged(UserEvent, frozen=True, kw_only=True):
    """The password was set or reset (its hash is in the credentials bucket)."""

    reset: bool = False  # set by an admin rather than by the user


class LicenseAssigned(UserEvent, frozen=True, kw_only=True):
    plan: PlanName


class UserLoggedIn(UserEvent, frozen=True, kw_only=True):
    session_id: Id  # not the token: an id that names the session in the audit trail
    client: ClientAddress = ""


class LoginFailed(UserEvent, frozen=True, kw_only=True):
    """``user_id`` is the user the name belongs to, or ``unknown`` for a name no user has."""

    username: Annotated[str, msgspec.Meta(max_length=200)]
    client: ClientAddress = ""
    reason: Text = ""


class UserLoggedOut(UserEvent, frozen=True, kw_only=True):
    session_id: Id
    reason: Text = ""  # "logout", "new login", "disabled", ...


class SessionExpired(UserEvent, frozen=True, kw_only=True):
    session_id: Id
    reason: Text = ""  # "idle" or "absolute"


class ApiKeyCreated(UserEvent, frozen=True, kw_only=True):
    key_id: Id
    name: Name
    scopes: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=32)
    ] = []


class ApiKeyRevoked(UserEvent, frozen=True, kw_only=True):
    key_id: Id


# -- runner keys --------------------------------------------------------------------
# On ``tb.runnerkey.<key_id>.<type>``, not ``tb.runner.<runner_id>.<type>``: runners may
# publish on their own ``tb.runner`` subjects, and nobody but the API may say a key exists.


class RunnerKeyEvent(Event, frozen=True, kw_only=True):
    key_id: Id


class RunnerKeyCreated(RunnerKeyEvent, frozen=True, kw_only=True):
    """An admin made a runner key (its hash is in the runner-keys bucket, never here)."""

    name: Name
    runner_id: Id  # the runner (and NATS user) the key's credentials act as


class RunnerKeyRevoked(RunnerKeyEvent, frozen=True, kw_only=True):
    reason: Text = ""


# -- datasets -----------------------------------------------------------------------
# A version's rows (proxy passwords among them) are in the ``tb_datasets`` object store
# under ``object_name``; the log records only where they are and what they hash to.

DatasetKind = Literal["targets", "proxies", "devices", "settings"]
DatasetFormat = Literal["csv", "txt", "xlsx", "docx", "json"]


class DatasetEvent(Event, frozen=True, kw_only=True):
    dataset_id: Id


class DatasetCreated(DatasetEvent, frozen=True, kw_only=True):
    """``owner``: the user who made it (and who alone, with admins, may change it)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    kind: DatasetKind
    owner: Actor


class DatasetVersionUploaded(DatasetEvent, frozen=True, kw_only=True):
    """An immutable version: the parsed rows, stored as JSON lines under ``object_name``
    (content-addressed by their ``sha256``); ``source_sha256`` is the uploaded file's."""

    version: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    format: DatasetFormat
    object_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    sha256: Sha256
    size_bytes: Count
    rows: Count
    source_sha256: Sha256
    source_size: Count


class DatasetRenamed(DatasetEvent, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class DatasetDeleted(DatasetEvent, frozen=True, kw_only=True):
    reason: Text = ""


class DatasetShared(DatasetEvent, frozen=True, kw_only=True):
    """``user_id`` may now see and use the dataset (not change it)."""

    user_id: Id


class DatasetUnshared(DatasetEvent, frozen=True, kw_only=True):
    user_id: Id


# -- platform data -----------------------------------------------------------------


class DeviceCatalogueAdopted(Event, frozen=True, kw_only=True):
    """The device catalogue version new jobs are created with, from now on: the newest
    shipped one at a system's first start, a newer one when an admin takes it. A job
    keeps the version it was created with. ``actor`` is who took it (``system`` at
    first start); ``previous`` the version in use before (0: none)."""

    version: Version
    sha256: Sha256
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    previous: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


JobEvents = (
    JobCreated
    | JobApprovalRequested
    | JobApproved
    | JobRejected
    | JobRefused
    | JobStarted
    | JobPaused
    | JobResumed
    | JobProgressed
    | JobCancelled
    | JobCompleted
    | JobFailed
)
FlowEvents = (
    FlowDispatched
    | FlowStarted
    | PageVisited
    | PageLeft
    | ClickDone
    | ClickSkipped
    | FlowDone
    | FlowFailed
    | FlowStalled
    | FlowReleased
    | ProxyFailed
    | EgressRefused
)
RunnerEvents = RunnerRegistered | RunnerDraining | RunnerDeregistered
ConsentEvents = DomainClaimed | ConsentGiven | ConsentVerificationFailed | ConsentRevoked
ProxyEvents = ProxyRegistered | ProxyRetired | ProxyMarkedBad | ProxyCheckFailed | ProxyRestored
UserEvents = (
    UserCreated
    | RoleChanged
    | UserDisabled
    | UserEnabled
    | PasswordChanged
    | LicenseAssigned
    | UserLoggedIn
    | LoginFailed
    | UserLoggedOut
    | SessionExpired
    | ApiKeyCreated
    | ApiKeyRevoked
)
RunnerKeyEvents = RunnerKeyCreated | RunnerKeyRevoked

DatasetEvents = (
    DatasetCreated
    | DatasetVersionUploaded
    | DatasetRenamed
    | DatasetDeleted
    | DatasetShared
    | DatasetUnshared
)

TbEvent = (
    JobEvents
    | FlowEvents
    | RunnerEvents
    | ConsentEvents
    | ProxyEvents
    | UserEvents
    | RunnerKeyEvents
    | DatasetEvents
    | DeviceCatalogueAdopted
)

_decoder = msgspec.json.Decoder(TbEvent)
_encoder = msgspec.json.Encoder()


def decode_event(data: bytes) -> TbEvent:
    """Decode one event; raises ``msgspec.DecodeError`` for bytes that are not JSON and its
    subclass ``msgspec.ValidationError`` for JSON that is not an event. Readers of the log
    use ``schemas.stored.decode_stored``, which also checks the subject."""
    event: TbEvent = _decoder.decode(data)
    return event


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


class Envelope(msgspec.Struct, frozen=True):
    """An event as stored: its stream sequence is the projections' checkpoint."""

    seq: int
    subject: str
    event: TbEvent
    msg_id: str = ""  # its Nats-Msg-Id: which command (or report) stored it


def event_schema() -> dict[str, object]:
    """JSON Schema of every event, for auditors (``tb schema``)."""
    (schema,), components = msgspec.json.schema_components([TbEvent])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "TrafficBuster events",
        **schema,
        "$defs": components,
    }
