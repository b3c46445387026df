"""The only door to JetStream: connect, provision, append (dedupe + OCC), read.

Everything else talks to NATS through a ``Bus``; subjects and ids come from
``schemas.subjects``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Container,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    Header,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from engine.cancellation import raise_if_cancelled
from engine.publisher import PUBLISH_TIMEOUT, AckedPublisher, Appended
from engine.puller import Puller, stream_seq
from engine.quarantine import Quarantine
from engine.transient import WRONG_LAST_SEQUENCE, Backoff
from schemas import subjects
from schemas.events import Envelope, Event, encode_event
from schemas.logs import LogLine, encode_log_line, encode_log_lines
from schemas.quarantine import QuarantinedMessage
from schemas.stored import Undecodable, stored_envelope

log = structlog.get_logger("tb.bus")

INVALID_SUBJECT = 10052  # JetStream: a consumer's filter is not a valid subject
GONE_AFTER = 30.0  # seconds a finite read waits for counted messages that do not come
ERROR_LOG_EVERY = 10.0  # seconds between two log lines about the same connection error
T = TypeVar("T")

__all__ = [
    "Appended",
    "Batch",
    "Bus",
    "BusConfig",
    "ConcurrencyConflict",
    "ConsumerSettingsRefused",
    "Expect",
    "applied_by",
    "retry_on_conflict",
    "without_credentials",
]


class ConcurrencyConflict(Exception):
    """Someone appended to the aggregate since we read it (JetStream error 10071)."""

    def __init__(self, stream_filter: str, expected: int) -> None:
        super().__init__(f"{stream_filter}: expected last sequence {expected}, it moved on")
        self.stream_filter, self.expected = stream_filter, expected


class CredentialsRefused(Exception):
    """The server refuses the connection's user or password: retrying cannot help."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"{url}: {reason}: NATS refuses this user and password"
            " (check TB_NATS_USER and TB_NATS_PASSWORD, or the URL's user:password)"
        )


class ConsumerSettingsRefused(Exception):
    """An existing consumer keeps settings that differ from ours and the server will
    not update it; ``settings`` names the differing ones (``ack_wait``, ``max_deliver``)."""

    def __init__(
        self, consumer: str, have: ConsumerConfig, want: ConsumerConfig, reason: str
    ) -> None:
        self.consumer, self.reason = consumer, reason
        self.settings = {
            name: (getattr(have, name), getattr(want, name))
            for name in ("ack_wait", "max_deliver")
            if getattr(have, name) != getattr(want, name)
        }
        changes = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in self.settings.items())
        super().__init__(f"consumer {consumer}: cannot apply {changes}: {reason}")


@dataclass(frozen=True)
class BusConfig:
    """Stream and consumer settings; R3 and longer ack waits in scaled mode."""

    replicas: int = 1
    duplicate_window: float = 120.0
    ack_wait: float = 60.0
    max_deliver: int = 5
    presence_ttl: float = 15.0
    logs_max_age: float = 7 * 24 * 3600.0
    screenshots_max_age: float = 7 * 24 * 3600.0  # failure screenshots age out, not pile up


@dataclass(frozen=True, slots=True)
class Batch:
    """One read of the log: the events, and how far it got.

    ``last_seq`` is the stream sequence of the last message read, quarantined ones
    included: a reader that keeps a position (a checkpoint) moves it there, past
    anything it had to skip.
    """

    envelopes: list[Envelope]
    last_seq: int
    quarantined: list[QuarantinedMessage]
    known: list[int] = field(default_factory=list)  # passed over undecoded (``read_batches``)


@dataclass(frozen=True)
class Expect:
    """Optimistic concurrency: the stream sequence of the aggregate's last event (0 = none)."""

    stream_filter: str
    last_seq: int


class Bus:
    def __init__(self, nc: Client, config: BusConfig, name: str = "tb") -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=PUBLISH_TIMEOUT)
        self.config = config
        self.name = name
        self.publisher = AckedPublisher(nc)
        self.quarantine = Quarantine(self.publisher, detected_by=name)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str,
        config: BusConfig | None = None,
        connect_timeout: float = 5.0,
        inbox_prefix: str = "_INBOX",
    ) -> Bus:
        """``inbox_prefix``: where replies come back; a runner's NATS user may only
        subscribe below its own (``engine.nats_permissions.runner_inbox``)."""
        last: dict[str, float] = {}
        shown = without_credentials(url)
        auth_refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(err: Exception) -> None:
            if is_auth_error(err) and not auth_refused.done():
                auth_refused.set_result(err)  # only read while the first connection is made
            # the client retries every half second: say so once per kind of error a while
            refused = isinstance(err, ConnectionRefusedError)
            key = "refused" if refused else type(err).__name__
            now = time.monotonic()
            if now - last.get(key, -ERROR_LOG_EVERY) < ERROR_LOG_EVERY:
                return
            last[key] = now
            if refused:
                log.warning("Connection Refused", url=shown, retrying=True)
            else:
                log.warning("nats.error", error=str(err))

        options: dict[str, Any] = {  # the client's annotations say int where it takes float
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": 0.5,
        }
        nc = Client()
        connecting = asyncio.ensure_future(
            nc.connect(
                url,
                name=name,
                drain_timeout=5,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=on_error,
                inbox_prefix=inbox_prefix,
                **options,
            )
        )
        first: set[asyncio.Future[Any]] = {connecting, auth_refused}
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connecting.done():  # refused, or our caller gave up: stop retrying
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await nc.close()
        if connecting.cancelled():
            raise CredentialsRefused(shown, str(auth_refused.result()))
        connecting.result()
        return cls(nc, config or BusConfig(), name)

    async def close(self) -> None:
        await self.publisher.close()
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- provisioning ---------------------------------------------------------------

    async def provision(self) -> None:
        """Create or update streams, buckets and the advisory capture; safe to repeat."""
        c = self.config
        await self._ensure_stream(
            StreamConfig(
                name=subjects.EVENTS_STREAM,
                subjects=subjects.EVENT_SUBJECTS,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                duplicate_window=c.duplicate_window,
                discard=DiscardPolicy.OLD,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=subjects.LOGS_STREAM,
                subjects=subjects.LOG_SUBJECTS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=c.logs_max_age,
                duplicate_window=c.duplicate_window,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=subjects.QUARANTINE_STREAM,
                subjects=subjects.QUARANTINE_SUBJECTS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                duplicate_window=c.duplicate_window,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=subjects.ADVISORIES_STREAM,
                subjects=[subjects.max_deliveries_advisory("*")],
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=c.logs_max_age,
            )
        )
        for bucket in (subjects.RUNNERS_BUCKET, subjects.LEASES_BUCKET):
            # both hold liveness: an entry not refreshed within the TTL is gone
            kv = KeyValueConfig(
                bucket=bucket, ttl=c.presence_ttl, replicas=c.replicas, storage=StorageType.FILE
            )
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.js.create_key_value(kv)
        for bucket, max_age in (
            (subjects.DATASETS_BUCKET, None),
            (subjects.DISPATCHER_BUCKET, None),
            (subjects.SCREENSHOTS_BUCKET, c.screenshots_max_age),
            (subjects.LOGS_BUCKET, None),
        ):
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.js.create_object_store(
                    bucket,
                    config=ObjectStoreConfig(
                        replicas=c.replicas, storage=StorageType.FILE, ttl=max_age
                    ),
                )
            if max_age is not None:
                await self._keep_max_age(f"OBJ_{bucket}", max_age)

    async def _keep_max_age(self, stream: str, max_age: float) -> None:
        """A bucket made before its age limit (or with another) gets the current one."""
        info = await self.js.stream_info(stream)
        if info.config.max_age != max_age:
            await self.js.update_stream(dataclasses.replace(info.config, max_age=max_age))

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name or "")
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)
        else:
            await self.js.update_stream(config)

    async def ensure_dispatch_consumer(self, os: str, browser: str) -> str:
        """The platform's shared durable pull consumer (never ``inactive_threshold``)."""
        durable = subjects.dispatch_consumer(os, browser)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subjects.dispatch_subject(os, browser),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait,
            max_deliver=self.config.max_deliver,
            max_ack_pending=10_000,
        )
        # create, or update an existing one to this ack wait and max deliver; when the
        # server cannot (a setting it refuses to change), say which setting was not applied
        try:
            await self.js.add_consumer(subjects.EVENTS_STREAM, config)
        except nats.js.errors.NotFoundError:
            raise  # no stream yet
        except nats.js.errors.APIError as err:
            info = await self.js.consumer_info(subjects.EVENTS_STREAM, durable)
            have = info.config
            if have.ack_wait != config.ack_wait or have.max_deliver != config.max_deliver:
                raise ConsumerSettingsRefused(durable, have, config, str(err)) from err
        return durable

    async def delivered_up_to(self, consumer: str) -> int | None:
        """The stream sequence up to which a dispatch consumer has delivered its work items
        (each at least once), or ``None`` when there is no such consumer."""
        try:
            info = await self.js.consumer_info(subjects.EVENTS_STREAM, consumer)
        except nats.js.errors.NotFoundError:
            return None
        delivered = info.delivered
        return int(delivered.stream_seq or 0) if delivered is not None else 0

    # -- writing --------------------------------------------------------------------

    def _headers(self, event: Event, msg_id: str, expect: Expect | None) -> dict[str, str]:
        headers = {subjects.MSG_ID_HEADER: msg_id, subjects.TYPE_HEADER: type(event).__name__}
        if expect is not None:
            headers[subjects.EXPECTED_LAST_SUBJECT_SEQ] = str(expect.last_seq)
            headers[subjects.EXPECTED_LAST_SUBJECT_SEQ_SUBJECT] = expect.stream_filter
        return headers

    async def append(self, event: Event, *, msg_id: str, expect: Expect | None = None) -> Appended:
        """Store one event; raises ``ConcurrencyConflict`` when ``expect`` no longer holds.

        Only events move an aggregate on: when what was stored on its subjects since
        ``expect`` is all quarantined (garbage no reader takes as an event), the append is
        made again expecting the last of those, instead of conflicting for ever.
        """
        while True:
            try:
                return await (await self.append_nowait(event, msg_id=msg_id, expect=expect))
            except nats.js.errors.APIError as err:
                if expect is None or err.err_code != WRONG_LAST_SEQUENCE:
                    raise
                past = await self._past_quarantined(expect)
                if past is None:
                    raise ConcurrencyConflict(expect.stream_filter, expect.last_seq) from err
                expect = Expect(expect.stream_filter, past)

    async def _past_quarantined(self, expect: Expect) -> int | None:
        """The last sequence on ``expect``'s subjects if only quarantined messages follow
        ``expect.last_seq`` there, else ``None`` (an event did: a real conflict)."""
        last = expect.last_seq
        batches = self.read_batches(expect.last_seq + 1, expect.stream_filter, follow=False)
        try:
            async for batch in batches:
                if batch.envelopes:
                    return None
                last = batch.last_seq
        finally:
            await batches.aclose()
        return last if last > expect.last_seq else None

    async def append_nowait(
        self, event: Event, *, msg_id: str, expect: Expect | None = None
    ) -> asyncio.Future[Appended]:
        """Send one event and return its ack without waiting for it.

        Awaiting the future raises what ``append`` raises (but a 10071 stays a nats-py
        ``APIError``); publishes on one connection are stored in the order they were sent.
        """
        headers = self._headers(event, msg_id, expect)
        headers[Header.EXPECTED_STREAM.value] = subjects.EVENTS_STREAM
        return await self.publisher.publish(
            subjects.subject_for(event), encode_event(event), headers
        )

    async def append_pipelined(self, items: Sequence[tuple[Event, str]]) -> list[Appended]:
        """Publish many events without waiting for each ack in turn, then await all acks."""
        futures = [
            await self.publisher.publish(
                subjects.subject_for(event),
                encode_event(event),
                self._headers(event, msg_id, None),
            )
            for event, msg_id in items
        ]
        return [await future for future in futures]

    # -- job logs -------------------------------------------------------------------

    async def append_log(self, line: LogLine, msg_id: str | None = None) -> Appended:
        """Store one job log line in ``TB_LOGS`` and wait for JetStream's ack."""
        headers = {Header.EXPECTED_STREAM.value: subjects.LOGS_STREAM}
        if msg_id is not None:
            headers[subjects.MSG_ID_HEADER] = msg_id
        subject = subjects.log_subject(line.job_id)
        return await (await self.publisher.publish(subject, encode_log_line(line), headers))

    async def log_nowait(self, job_id: str, encoded: Sequence[bytes], msg_id: str) -> None:
        """Send lines of one job's log (each as ``encode_log_line`` gave it) as one message
        without asking for an ack: best effort, lines NATS does not take are lost (nothing
        waits on them, nothing fails because of them)."""
        headers = {subjects.MSG_ID_HEADER: msg_id}
        subject = subjects.log_subject(job_id)
        await self.nc.publish(subject, encode_log_lines(encoded), headers=headers)

    # -- reading --------------------------------------------------------------------

    async def last_seq(self) -> int:
        info = await self.js.stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)

    async def load(self, stream_filter: str) -> list[Envelope]:
        """Every event of one aggregate, in order (for deciders); quarantined ones skipped."""
        envelopes: list[Envelope] = []
        async for batch in self.read_batches(1, stream_filter, follow=False):
            envelopes.extend(batch.envelopes)
        return envelopes

    async def read(
        self,
        start_seq: int,
        stream_filter: str | list[str] | None = None,
        *,
        follow: bool = True,
        batch: int = 500,
        idle_timeout: float = 1.0,
        on_caught_up: Callable[[], None] | None = None,
    ) -> AsyncIterator[list[Envelope]]:
        """``read_batches`` for readers that keep no position: non-empty event lists."""
        batches = self.read_batches(
            start_seq,
            stream_filter,
            follow=follow,
            batch=batch,
            idle_timeout=idle_timeout,
            on_caught_up=on_caught_up,
        )
        try:
            async for got in batches:
                if got.envelopes:
                    yield got.envelopes
        finally:
            await batches.aclose()

    async def read_batches(
        self,
        start_seq: int,
        stream_filter: str | list[str] | None = None,
        *,
        follow: bool = True,
        batch: int = 500,
        idle_timeout: float = 1.0,
        on_caught_up: Callable[[], None] | None = None,
        known: Container[int] | None = None,
    ) -> AsyncGenerator[Batch, None]:
        """Ordered batches of events from ``start_seq`` on (``read_stored``, decoded).

        A message that is not an event where it is stored is quarantined and left out,
        and ``Batch.last_seq`` still moves past it. Sequences in ``known`` (events the
        caller already holds, such as its own appends) are not decoded again, only listed
        in ``Batch.known``.
        """
        stored = self.read_stored(
            start_seq,
            stream_filter,
            follow=follow,
            batch=batch,
            idle_timeout=idle_timeout,
            on_caught_up=on_caught_up,
        )
        try:
            async for msgs in stored:
                envelopes: list[Envelope] = []
                quarantined: list[QuarantinedMessage] = []
                passed: list[int] = []
                for seq, msg in msgs:
                    if known is not None and seq in known:
                        passed.append(seq)
                        continue
                    try:
                        envelopes.append(stored_envelope(seq, msg.subject, msg.data, msg.headers))
                    except Undecodable as err:
                        record = self.quarantine_stored(seq, msg.subject, msg.data, err.reason)
                        quarantined.append(await record)
                yield Batch(envelopes, msgs[-1][0], quarantined, passed)
        finally:
            await stored.aclose()

    async def quarantine_stored(
        self, seq: int, subject: str, raw: bytes, reason: str
    ) -> QuarantinedMessage:
        """Record a message of the events stream that is no event where it is stored."""
        return await self.quarantine.record(
            stream=subjects.EVENTS_STREAM, seq=seq, subject=subject, raw=raw, reason=reason
        )

    async def read_stored(
        self,
        start_seq: int,
        stream_filter: str | list[str] | None = None,
        *,
        follow: bool = True,
        batch: int = 500,
        idle_timeout: float = 1.0,
        on_caught_up: Callable[[], None] | None = None,
    ) -> AsyncGenerator[list[tuple[int, Msg]], None]:
        """Ordered batches of the events stream's messages from ``start_seq`` on, as
        stored (with their stream sequences), none decoded: ``read_batches`` decodes and
        checks them, a reader that decodes elsewhere (a rebuild's fold process) takes
        these.

        An ephemeral pull consumer without acks, recreated from the last sequence seen
        whenever it goes away (server restart, lost heartbeat) or stops answering: the
        reader never skips and never repeats. With ``follow=False`` it stops at the end
        of the stream. ``on_caught_up`` is called whenever every message stored so far
        (that matches the filter) has been yielded.
        """
        next_seq = max(start_seq, 1)
        filters = [stream_filter] if isinstance(stream_filter, str) else stream_filter
        for subject in filters or ():
            if not is_subject_filter(subject):
                raise ValueError(f"cannot read {filters}: {subject!r} is no subject filter")
        backoff = Backoff("reader", cap=2.0)  # says so once per episode, not per retry
        while True:
            puller = None
            try:
                puller, remaining = await self._ephemeral_reader(next_seq, filters)
                backoff.succeeded()
                if remaining == 0:
                    if not follow:
                        return
                    if on_caught_up is not None:
                        on_caught_up()
                quiet = 0  # fetches in a row that brought nothing
                while True:
                    raise_if_cancelled()
                    msgs = await puller.fetch(batch, idle_timeout)
                    if not msgs:
                        quiet += 1
                        if not follow:
                            # a slow server is no end of the stream: what the consumer
                            # counted at its start is still coming, unless it is gone
                            # (removed by the stream's limits) for this long
                            if remaining <= 0 or puller.pending == 0:
                                return
                            if quiet * idle_timeout >= GONE_AFTER:
                                log.warning("reader.pending_never_came", left=remaining)
                                return
                            continue
                        if on_caught_up is not None:
                            on_caught_up()
                        continue
                    quiet = 0
                    fresh: list[tuple[int, Msg]] = []
                    for msg in msgs:
                        seq = stream_seq(msg)
                        if seq >= next_seq:
                            fresh.append((seq, msg))
                            next_seq = seq + 1
                    if fresh:
                        yield fresh
                    if on_caught_up is not None and puller.pending == 0:
                        on_caught_up()
                    if not follow:
                        remaining -= len(msgs)
                        if remaining <= 0:
                            return
            except (
                nats.js.errors.NotFoundError,
                nats.errors.ConnectionClosedError,
                nats.errors.TimeoutError,
            ) as err:
                if isinstance(err, nats.errors.ConnectionClosedError) and self.nc.is_closed:
                    raise
                await backoff.failed(err)  # then recreate the reader from next_seq
            except nats.js.errors.APIError as err:
                if err.code == 400 or err.err_code == INVALID_SUBJECT:
                    # the request, not the server: asking again cannot succeed
                    raise ValueError(f"cannot read {filters}: {err.description}") from err
                await backoff.failed(err)
            finally:
                if puller is not None:
                    await puller.close()

    async def _ephemeral_reader(
        self, start_seq: int, filters: list[str] | None
    ) -> tuple[Puller, int]:
        """A started puller on a new ephemeral consumer, and how many events it has."""
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        if filters and len(filters) == 1:
            config.filter_subject = filters[0]
            # named: the create request's subject then carries the filter (nats-server
            # 2.10+), which is what a runner's permissions check
            config.name = f"rd_{uuid.uuid4().hex}"
        elif filters:
            config.filter_subjects = filters
        info = await self.js.add_consumer(subjects.EVENTS_STREAM, config)
        puller = await self.puller(info.name, read_ahead=True)  # nothing to ack: no cost
        return puller, int(info.num_pending or 0)

    async def puller(self, consumer: str, *, read_ahead: bool = False) -> Puller:
        """Batched pulls from an existing consumer of the events stream (``Puller``)."""
        puller = Puller(
            self.nc, subjects.EVENTS_STREAM, consumer, self._api_prefix, read_ahead=read_ahead
        )
        return await puller.start()

    @property
    def _api_prefix(self) -> str:
        return str(getattr(self.js, "_prefix", "$JS.API"))

    # -- key/value ------------------------------------------------------------------

    async def kv(self, bucket: str) -> KeyValue:
        return await self.js.key_value(bucket)

    async def kv_keys(self, bucket: str) -> list[str]:
        """The keys of ``bucket`` that hold a message, a deleted key's marker included (its
        ``get`` raises KeyNotFoundError), in one stream-info request.

        nats-py's ``KeyValue.keys()`` may answer none while entries exist: its watcher
        ends the listing when the consumer has sent everything but the client has not
        yet handled the first message, as happens on a busy machine.
        """
        prefix = f"$KV.{bucket}."
        info = await self.js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
        return sorted(subject[len(prefix) :] for subject in info.state.subjects or {})


def is_auth_error(err: Exception) -> bool:
    """The server said the user or password is wrong (nats-py reports it as text)."""
    return (
        isinstance(err, nats.errors.AuthorizationError)
        or "authorization violation" in str(err).lower()
    )


def without_credentials(url: str) -> str:
    """A NATS URL fit for a log line: no user, password or token."""
    return ",".join(re.sub(r"^([a-z]+://)[^@/]*@", r"\1", part) for part in url.split(","))


def is_subject_filter(subject: str) -> bool:
    """A NATS subject filter: dot-separated tokens, none empty or holding whitespace, with
    ``>`` only as the last token (a named reader puts it in its API subject, where a bad one
    meets no responder rather than an error)."""
    tokens = subject.split(".")
    return all(
        token and not any(c.isspace() for c in token) and (token != ">" or i == len(tokens) - 1)
        and (len(token) == 1 or ("*" not in token and ">" not in token))
        for i, token in enumerate(tokens)
    )  # fmt: skip


def applied_by(envelopes: Sequence[Envelope], command_id: str) -> Appended | None:
    """Where a command's events already are in an aggregate's history, if it ran before.

    Dedupe by msg-id lasts the duplicate window; the log remembers for ever, so a retry
    of a command (same ``Idempotency-Key``) answers what the first run stored.
    """
    prefix = subjects.command_msg_id(command_id, 0).removesuffix("0")
    last = None
    for env in envelopes:
        n = env.msg_id[len(prefix) :] if env.msg_id.startswith(prefix) else ""
        if n.isascii() and n.isdigit():  # not "cmd:a:1:0" for command "a" (that is "a:1")
            last = env.seq
    return None if last is None else Appended(seq=last, duplicate=True)


async def retry_on_conflict(
    attempt: Callable[[], Awaitable[T]], *, tries: int = 8, base_delay: float = 0.005
) -> T:
    """Re-run read-decide-append when another writer won the race."""
    for n in range(tries):
        try:
            return await attempt()
        except ConcurrencyConflict:
            if n == tries - 1:
                raise
            await asyncio.sleep(base_delay * (2**n))
    raise AssertionError("unreachable")
