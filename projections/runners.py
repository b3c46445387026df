"""Read model of runner agents: who registered, on which platform and browser, with what
capacity and labels, and how many flows each completed and failed since it last started.

The counts are folded from the flow events that name the runner (``FlowDone``,
``FlowFailed``): each event is one flow run that runner reported, so a flow retried on
the same runner counts once per run. A ``FlowFailed`` the dispatcher wrote (stalled,
spent attempts) names no runner and counts for none. ``RunnerRegistered`` starts the
counts afresh: they are the runner's since its start, as its uptime is. A batch sums
its runs per runner (``Runs``) and adds them before the next runner event.
"""

from __future__ import annotations

from typing import Literal

import aiosqlite
import msgspec

from projections.db import iso
from schemas.events import (
    Envelope,
    FlowDone,
    FlowFailed,
    RunnerDeregistered,
    RunnerDraining,
    RunnerRegistered,
)
from schemas.flow_lifecycle import FlowProgress

RunnerStatus = Literal["registered", "draining", "deregistered"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runners (
        runner_id TEXT PRIMARY KEY,
        os TEXT NOT NULL,
        browser TEXT NOT NULL,
        browser_version TEXT NOT NULL DEFAULT '',
        slots INTEGER NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        hostname TEXT NOT NULL,
        version TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        flows_completed INTEGER NOT NULL DEFAULT 0,
        flows_failed INTEGER NOT NULL DEFAULT 0,
        registered_at TEXT NOT NULL,
        last_event_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
)

_labels = msgspec.json.Encoder()


class Runs:
    """Flow runs that runners reported in a batch: completed and failed, per runner."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}

    def count(self, event: FlowProgress) -> None:
        """A run, if the event reports one: a ``FlowDone`` or ``FlowFailed`` that names its
        runner (told by exact type: event classes are final)."""
        if type(event) is FlowDone:
            runner_id, column = event.runner_id, 0
        elif type(event) is FlowFailed:
            runner_id, column = event.runner_id, 1
        else:
            return
        if runner_id:
            counts = self._counts.get(runner_id)
            if counts is None:
                counts = self._counts[runner_id] = [0, 0]
            counts[column] += 1

    async def flush(self, db: aiosqlite.Connection) -> set[str]:
        """Add the counts; returns the ids of the runners that have a row."""
        changed: set[str] = set()
        for runner_id, (completed, failed) in self._counts.items():
            cur = await db.execute(
                "UPDATE runners SET flows_completed = flows_completed + ?,"
                " flows_failed = flows_failed + ? WHERE runner_id = ?",
                (completed, failed, runner_id),
            )
            if cur.rowcount:
                changed.add(runner_id)
        self._counts.clear()
        return changed


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one runner event; returns the ids of the runners whose rows changed."""
    event = env.event
    match event:
        case RunnerRegistered():
            # a runner that comes back registers again under its id: start a fresh record
            await db.execute(
                "INSERT INTO runners (runner_id, os, browser, browser_version, slots, labels,"
                " hostname, version, status, registered_at, last_event_at, last_seq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'registered', ?, ?, ?)"
                " ON CONFLICT (runner_id) DO UPDATE SET os = excluded.os,"
                " browser = excluded.browser, browser_version = excluded.browser_version,"
                " slots = excluded.slots, labels = excluded.labels,"
                " hostname = excluded.hostname, version = excluded.version,"
                " status = excluded.status, reason = NULL,"
                " flows_completed = 0, flows_failed = 0,"
                " registered_at = excluded.registered_at,"
                " last_event_at = excluded.last_event_at, last_seq = excluded.last_seq",
                (
                    event.runner_id, event.platform.os, event.platform.browser,
                    event.browser_version, event.slots, _labels.encode(event.labels).decode(),
                    event.hostname, event.version, iso(event.at), iso(event.at), env.seq,
                ),
            )  # fmt: skip
            return {event.runner_id}
        case RunnerDraining() | RunnerDeregistered():
            status: RunnerStatus = (
                "draining" if isinstance(event, RunnerDraining) else "deregistered"
            )
            reason = event.reason or None if isinstance(event, RunnerDeregistered) else None
            cur = await db.execute(
                "UPDATE runners SET status = ?, reason = ?, last_event_at = ?, last_seq = ?"
                " WHERE runner_id = ?",
                (status, reason, iso(event.at), env.seq, event.runner_id),
            )
            return {event.runner_id} if cur.rowcount else set()
    return set()
