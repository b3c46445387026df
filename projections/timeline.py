"""A job's timeline read from the log itself: what ``tb audit replay --job`` prints.

The log, not the audit table: it is the record an auditor trusts, it is there whether
or not a read model is (a stopped system, a replica elsewhere, a model being rebuilt),
and it cannot lag behind. The read is filtered by the server to the job's own subjects
and its platform's dispatch subject (work items carry the job in their body, not their
subject), so it costs the job's events plus that platform's work items, not the log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from engine.bus import Bus
from schemas import subjects
from schemas.events import Envelope, FlowEvent, JobCreated, JobEvent

Progress = Callable[[int, int], None]


async def job_timeline(
    bus: Bus, job_id: str, *, progress: Progress | None = None
) -> AsyncIterator[Envelope]:
    """The job's events in log order; ``progress(seq, last)`` after each batch read."""
    own = subjects.job_stream_filter(job_id)
    created = next(
        (env.event for env in await bus.load(own) if isinstance(env.event, JobCreated)), None
    )
    # without a valid creation (quarantined) the platform is unknown: every work queue
    dispatch = (
        subjects.dispatch_subject(created.platform.os, created.platform.browser)
        if created is not None
        else subjects.ALL_DISPATCH
    )
    last = await bus.last_seq()
    filters = [own, subjects.flow_subject(job_id, "*"), dispatch]
    batches = bus.read_batches(1, filters, follow=False)
    try:
        async for batch in batches:
            for env in batch.envelopes:
                if env.seq > last:
                    return
                if isinstance(env.event, JobEvent | FlowEvent) and env.event.job_id == job_id:
                    yield env
            if progress is not None:
                progress(min(batch.last_seq, last), last)
            if batch.last_seq >= last:
                return
    finally:
        await batches.aclose()
