"""A job's log: read from ``TB_LOGS`` (its first line on, then live), and saved.

``TB_LOGS`` keeps lines for a bounded age. When a job ends its log is saved to the
object store ``tb_logs`` (one JSON line per log line, ``<job_id>.jsonl``): shared by
every API replica, replicated like the streams, and independent of the read models,
which are rebuilt from ``TB`` alone and could not bring the lines back once
``TB_LOGS`` has aged them out.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import IO

import msgspec
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from engine.bus import Bus
from engine.puller import Puller, stream_seq
from engine.transient import Backoff, is_transient
from schemas import subjects
from schemas.events import JobCancelled, JobCompleted, JobFailed, JobRefused
from schemas.logs import LogLine, decode_log_lines, encode_log_line

SPOOL_IN_MEMORY = 1 << 20  # bytes of a log kept in memory before it spills to a file


ENDING_TYPES = frozenset(t.__name__ for t in (JobCompleted, JobFailed, JobCancelled, JobRefused))


async def last_job_event_type(bus: Bus, job_id: str) -> str | None:
    """The type of the last message stored on the job's subjects (``None``: there is no
    such job): one direct read, no consumer, for checks made per log line. The deciders
    append nothing after a job's end, so an ending type there means the job has ended."""
    try:
        msg = await bus.js.get_last_msg(subjects.EVENTS_STREAM, subjects.job_stream_filter(job_id))
    except nats.js.errors.NotFoundError:
        return None
    found = subjects.job_of_subject(msg.subject or "")
    return found[1] if found else None


@dataclass(frozen=True, slots=True)
class StoredLine:
    seq: int  # the sequence in TB_LOGS of its message (lines sent together share one)
    line: LogLine


async def read_log(
    bus: Bus, job_id: str, *, follow: bool, linger: float = 1.0, batch: int = 500
) -> AsyncGenerator[list[StoredLine], None]:
    """The job's lines in order, in batches. With ``follow`` it never ends: an empty
    batch says it has caught up and waited ``linger`` seconds for more, so a caller can
    decide whether to go on. Without, it stops at the last line stored. A message on the
    job's subject that holds no log lines (one, or several sent together) is skipped."""
    next_seq = 1
    backoff = Backoff(f"log reader {job_id}", cap=2.0)
    while True:
        puller: Puller | None = None
        try:
            puller, remaining = await _reader(bus, job_id, next_seq)
            backoff.succeeded()
            if remaining == 0 and not follow:
                return
            while True:
                msgs = await puller.fetch(batch, linger)
                lines: list[StoredLine] = []
                for msg in msgs:
                    seq = stream_seq(msg)
                    if seq < next_seq:
                        continue
                    next_seq = seq + 1
                    with contextlib.suppress(msgspec.DecodeError):
                        lines.extend(StoredLine(seq, line) for line in decode_log_lines(msg.data))
                if lines or (follow and not msgs):
                    yield lines
                if not follow:
                    remaining -= len(msgs)
                    if remaining <= 0 or not msgs:
                        return
        except Exception as err:
            if not is_transient(err, bus.nc):
                raise
            await backoff.failed(err)  # then a new reader from next_seq
        finally:
            if puller is not None:
                await puller.close()
                with contextlib.suppress(Exception):
                    await bus.js.delete_consumer(subjects.LOGS_STREAM, puller.consumer)


async def _reader(bus: Bus, job_id: str, start_seq: int) -> tuple[Puller, int]:
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        filter_subject=subjects.log_subject(job_id),
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    info = await bus.js.add_consumer(subjects.LOGS_STREAM, config)
    prefix = str(getattr(bus.js, "_prefix", "$JS.API"))
    puller = await Puller(bus.nc, subjects.LOGS_STREAM, info.name, prefix).start()
    return puller, int(info.num_pending or 0)


# -- saved logs ---------------------------------------------------------------------------


async def save_log(bus: Bus, job_id: str) -> int:
    """Save the job's log as ``TB_LOGS`` holds it now; returns how many lines. Saving
    again replaces the object (two API replicas saving one job store the same lines)."""
    count = 0
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        batches = read_log(bus, job_id, follow=False)
        try:
            async for batch in batches:
                for stored in batch:
                    spool.write(encode_log_line(stored.line))
                    spool.write(b"\n")
                    count += 1
        finally:
            await batches.aclose()
        spool.seek(0)
        store = await bus.js.object_store(subjects.LOGS_BUCKET)
        await store.put(subjects.saved_log_name(job_id), spool)  # type: ignore[arg-type]
    return count


@contextlib.asynccontextmanager
async def saved_log(bus: Bus, job_id: str) -> AsyncIterator[IO[bytes] | None]:
    """The saved log as a file of JSON lines (read from its start), or ``None`` when the
    job's log was never saved."""
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
        try:
            store = await bus.js.object_store(subjects.LOGS_BUCKET)
            await store.get(subjects.saved_log_name(job_id), writeinto=spool)  # type: ignore[arg-type]
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            yield None
            return
        spool.seek(0)
        yield spool
