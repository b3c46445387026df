"""The read model as a whole: its schema and the one batch fold the projector and replay share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiosqlite
import msgspec

from projections import (
    audit,
    consents,
    datasets,
    flows,
    jobs,
    licences,
    proxies,
    run_metrics,
    runners,
    schedules,
    users,
)
from projections.db import checkpoint, connect, create_schema, set_checkpoint, transaction
from schemas.events import (
    ClickDone,
    ClickSkipped,
    ConsentEvent,
    DatasetEvent,
    EgressRefused,
    Envelope,
    Event,
    JobEvent,
    LicenseAssigned,
    PageLeft,
    PageVisited,
    ProxyEvent,
    ProxyFailed,
    RunnerEvent,
    UserEvent,
)

CHECKPOINT = "read_model"
SCHEMA = (
    *jobs.SCHEMA,
    *flows.SCHEMA,
    *runners.SCHEMA,
    *consents.SCHEMA,
    *proxies.SCHEMA,
    *run_metrics.SCHEMA,
    *audit.SCHEMA,
    *datasets.SCHEMA,
    *schedules.SCHEMA,
    *licences.SCHEMA,
    *users.SCHEMA,
)
# bump when a table changes: a read model of another version is rebuilt from the log
# 6: run metrics (histograms, outcomes per minute, events by type); 7: external jobs
# (kind, progress); 8: the audit trail, datasets and schedules; 9: users' licences, and
# jobs by their creator (running jobs per user); 10: users; 11: consents: when
# verified, subdomains; 12: datasets folded, their shares; 14: proxies: bypass list, DNS;
# 15: jobs' device catalogue
SCHEMA_VERSION = 15

# most of a log, told apart by exact type (event classes are final) as isinstance costs
_PAGES_AND_CLICKS: frozenset[type[Event]] = frozenset(
    {PageVisited, PageLeft, ClickDone, ClickSkipped}
)


def _creates_index(statement: str) -> bool:
    return statement.lstrip().startswith("CREATE INDEX")


TABLES = tuple(statement for statement in SCHEMA if not _creates_index(statement))
INDEXES = tuple(statement for statement in SCHEMA if _creates_index(statement))


class ProjectionUpdate(msgspec.Struct, frozen=True):
    """What one applied batch changed, for live pushes; ``seq`` is the new checkpoint."""

    seq: int
    job_ids: set[str] = msgspec.field(default_factory=set)
    runner_ids: set[str] = msgspec.field(default_factory=set)
    domains: set[str] = msgspec.field(default_factory=set)
    proxy_ids: set[str] = msgspec.field(default_factory=set)


async def open_read_model(path: Path, *, indexes: bool = True) -> aiosqlite.Connection:
    """Open (or create) the read model; one of another schema version starts over empty,
    and the projector refolds the log into it from sequence 1.

    ``indexes=False``: the tables alone, for a file that is filled before anything reads
    it (a rebuild; the folds look rows up by primary key only). ``create_indexes`` adds
    them after, sorting each once instead of keeping it in order row by row.
    """
    db = await connect(path)
    try:
        [(version,)] = await db.execute_fetchall("PRAGMA user_version")
        if version != SCHEMA_VERSION:
            await _drop_everything(db)
        await create_schema(db, SCHEMA if indexes else TABLES)
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        await db.close()
        raise
    return db


async def create_indexes(db: aiosqlite.Connection) -> None:
    await create_schema(db, INDEXES)


async def _drop_everything(db: aiosqlite.Connection) -> None:
    async with transaction(db):
        tables = await db.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
        for (name,) in tables:
            await db.execute(f'DROP TABLE IF EXISTS "{name}"')


async def apply_batch(
    db: aiosqlite.Connection, batch: Sequence[Envelope], last_seq: int = 0
) -> ProjectionUpdate | None:
    """Apply ordered envelopes and the new checkpoint in one transaction.

    ``last_seq``: how far the read got, past messages it skipped (quarantined ones): the
    checkpoint moves there too, so a bad message never holds the read model back.
    Returns None when everything was already applied.
    """
    update = ProjectionUpdate(seq=0)
    async with transaction(db):
        applied = await checkpoint(db, CHECKPOINT)
        fresh = [env for env in batch if env.seq > applied]
        seq = max([last_seq, *(env.seq for env in fresh)])
        if seq <= applied:
            return None  # redelivered after a crash: already counted
        flow_batch = await flows.FlowBatch.load(db, fresh)
        runs = runners.Runs()
        for env in fresh:
            event = env.event
            if flows.is_progress(event):
                job_id = flow_batch.apply(env, event)
                if job_id is not None:
                    update.job_ids.add(job_id)
                runs.count(event)
            elif type(event) in _PAGES_AND_CLICKS:
                continue  # the run metrics and the audit trail take them below
            elif isinstance(event, EgressRefused):
                update.job_ids.update(await jobs.apply(db, env))
            elif isinstance(event, ProxyFailed | ProxyEvent):
                update.proxy_ids.update(await proxies.apply(db, env))
            elif isinstance(event, JobEvent):
                await flow_batch.flush(db)  # the job's row as its flows left it, in order
                update.job_ids.update(await jobs.apply(db, env))
                await flow_batch.reload_job(db, event.job_id)
            elif isinstance(event, RunnerEvent):
                update.runner_ids.update(await runs.flush(db))  # the runs before a restart
                update.runner_ids.update(await runners.apply(db, env))
            elif isinstance(event, ConsentEvent):
                update.domains.update(await consents.apply(db, env))
            elif isinstance(event, DatasetEvent):
                await datasets.apply(db, env)
            elif isinstance(event, LicenseAssigned):
                await licences.apply(db, env)
            elif isinstance(event, UserEvent):
                await users.apply(db, env)
        await flow_batch.flush(db)
        update.runner_ids.update(await runs.flush(db))
        await run_metrics.apply_batch(db, fresh)  # reads the flow rows just written
        await audit.apply(db, fresh)
        await set_checkpoint(db, CHECKPOINT, seq)
    return msgspec.structs.replace(update, seq=seq)


async def applied_seq(db: aiosqlite.Connection) -> int:
    return await checkpoint(db, CHECKPOINT)
