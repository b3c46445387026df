"""The read model as a whole: its schema and the one batch fold the projector and replay share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import msgspec

from projections import consents, jobs, runners
from projections.db import checkpoint, connect, create_schema, set_checkpoint, transaction
from schemas.events import ConsentEvent, Envelope, FlowEvent, JobEvent, RunnerEvent

CHECKPOINT = "read_model"
SCHEMA = (*jobs.SCHEMA, *runners.SCHEMA, *consents.SCHEMA)


class ProjectionUpdate(msgspec.Struct, frozen=True):
    """What one applied batch changed, for live pushes; ``seq`` is the new checkpoint."""

    seq: int
    job_ids: set[str] = msgspec.field(default_factory=set)
    runner_ids: set[str] = msgspec.field(default_factory=set)
    domains: set[str] = msgspec.field(default_factory=set)


async def open_read_model(path: Path) -> aiosqlite.Connection:
    db = await connect(path)
    try:
        await create_schema(db, SCHEMA)
    except BaseException:
        await db.close()
        raise
    return db


async def apply_batch(
    db: aiosqlite.Connection, batch: Sequence[Envelope]
) -> ProjectionUpdate | None:
    """Apply ordered envelopes and the new checkpoint in one transaction.

    Returns None when every envelope was already applied.
    """
    update = ProjectionUpdate(seq=0)
    async with transaction(db):
        applied = await checkpoint(db, CHECKPOINT)
        fresh = [env for env in batch if env.seq > applied]
        if not fresh:
            return None  # redelivered after a crash: already counted
        for env in fresh:
            event = env.event
            if isinstance(event, JobEvent | FlowEvent):
                update.job_ids.update(await jobs.apply(db, env))
            elif isinstance(event, RunnerEvent):
                update.runner_ids.update(await runners.apply(db, env))
            elif isinstance(event, ConsentEvent):
                update.domains.update(await consents.apply(db, env))
        seq = max(env.seq for env in fresh)
        await set_checkpoint(db, CHECKPOINT, seq)
    return msgspec.structs.replace(update, seq=seq)


async def applied_seq(db: aiosqlite.Connection) -> int:
    return await checkpoint(db, CHECKPOINT)
