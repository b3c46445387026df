"""Read model of the proxy pool: each proxy's place, how flows use it (bypass list, DNS
setting), health and failures, never its credentials (the log does not hold them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiosqlite
import msgspec

from projections.db import iso
from schemas.events import (
    Envelope,
    ProxyCheckFailed,
    ProxyEvent,
    ProxyFailed,
    ProxyMarkedBad,
    ProxyRegistered,
    ProxyRestored,
    ProxyRetired,
)
from schemas.proxies import ProxyDns
from schemas.proxy_state import ProxyState, ProxyStatus, evolve_proxy

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS proxies (
        proxy_id TEXT PRIMARY KEY,
        label TEXT,
        scheme TEXT NOT NULL,
        host TEXT NOT NULL,
        port INTEGER NOT NULL,
        has_credentials INTEGER NOT NULL,
        status TEXT NOT NULL,
        registered_at TEXT NOT NULL,
        bad_since TEXT,
        bad_until TEXT,
        restored_at TEXT,
        retired_at TEXT,
        reason TEXT,
        times_marked_bad INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        last_failure_at TEXT,
        last_error TEXT,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        bypass TEXT NOT NULL DEFAULT '[]',
        dns TEXT NOT NULL DEFAULT 'local'
    )""",
    "CREATE INDEX IF NOT EXISTS proxies_by_label ON proxies (label)",
)


class ProxyView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``GET /api/v1/proxies``: ``status`` ok (handed out), bad (since ``bad_since``, next
    check at ``bad_until``) or retired; ``restored_at`` is the last time it came back."""

    proxy_id: str
    label: str | None = None
    scheme: str
    host: str
    port: int
    has_credentials: bool
    bypass: list[str] = []  # hosts its flows reach directly, not through it
    dns: ProxyDns = "local"  # who resolves its flows' names: the runner, or the proxy
    status: ProxyStatus
    registered_at: datetime
    bad_since: datetime | None = None
    bad_until: datetime | None = None
    restored_at: datetime | None = None
    retired_at: datetime | None = None
    reason: str | None = None
    times_marked_bad: int
    failures: int  # ProxyFailed reported by runners, in all
    last_failure_at: datetime | None = None
    last_error: str | None = None
    updated_at: datetime


async def apply(db: aiosqlite.Connection, env: Envelope) -> set[str]:
    """Fold one proxy event (or a runner's ProxyFailed); returns the proxies that changed.
    The status follows the rule every reader shares (``schemas.proxy_state``)."""
    event = env.event
    if not isinstance(event, ProxyEvent | ProxyFailed) or event.proxy_id is None:
        return set()
    pid, at = event.proxy_id, iso(event.at)
    if isinstance(event, ProxyRegistered):
        cur = await db.execute(
            "INSERT INTO proxies (proxy_id, label, scheme, host, port, has_credentials, bypass,"
            " dns, status, registered_at, updated_at, last_seq)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok', ?, ?, ?)"
            " ON CONFLICT (proxy_id) DO NOTHING",
            (pid, event.label, event.scheme, event.host, event.port, event.has_credentials,
             msgspec.json.encode(event.bypass).decode(), event.dns, at, at, env.seq),
        )  # fmt: skip
        return {pid} if cur.rowcount else set()
    if isinstance(event, ProxyFailed):
        cur = await db.execute(
            "UPDATE proxies SET failures = failures + 1, last_failure_at = ?, last_error = ?,"
            " updated_at = ?, last_seq = ? WHERE proxy_id = ?",
            (at, f"{event.error}: {event.reason}", at, env.seq, pid),
        )
        return {pid} if cur.rowcount else set()
    before = await _status(db, pid)
    if isinstance(event, ProxyCheckFailed):
        if before != ProxyStatus.BAD:
            return set()
        return await _update(
            db, env, pid, {"bad_until": iso(event.bad_until), "reason": event.reason}
        )
    after = evolve_proxy(ProxyState(proxy_id=pid, status=before), event).status
    if after == before:
        return set()  # late or repeated: the rule leaves the proxy as it is
    changes: dict[str, Any] = {"status": after.value}
    match event:
        case ProxyRetired(reason=reason):
            changes |= {"retired_at": at, "reason": reason or None, "bad_until": None}
        case ProxyMarkedBad(bad_until=until, reason=reason):
            changes |= {"bad_since": at, "bad_until": iso(until), "reason": reason or None}
        case ProxyRestored():
            changes |= {"restored_at": at, "bad_until": None, "reason": None}
    return await _update(db, env, pid, changes, marked=isinstance(event, ProxyMarkedBad))


async def _status(db: aiosqlite.Connection, pid: str) -> ProxyStatus:
    rows = list(await db.execute_fetchall("SELECT status FROM proxies WHERE proxy_id = ?", (pid,)))
    return ProxyStatus(rows[0][0]) if rows else ProxyStatus.NONE


async def _update(
    db: aiosqlite.Connection, env: Envelope, pid: str, changes: dict[str, Any], marked: bool = False
) -> set[str]:
    sets = ", ".join(f"{name} = ?" for name in changes)
    bump = ", times_marked_bad = times_marked_bad + 1" if marked else ""
    await db.execute(
        f"UPDATE proxies SET {sets}{bump}, updated_at = ?, last_seq = ? WHERE proxy_id = ?",
        (*changes.values(), iso(env.event.at), env.seq, pid),
    )
    return {pid}


_COLUMNS = (
    "proxy_id, label, scheme, host, port, has_credentials, bypass, dns, status, registered_at,"
    " bad_since,"
    " bad_until, restored_at, retired_at, reason, times_marked_bad, failures, last_failure_at,"
    " last_error, updated_at"
)


async def list_proxies(
    db: aiosqlite.Connection,
    status: ProxyStatus | None = None,
    *,
    limit: int = -1,
    after: str | None = None,
) -> list[ProxyView]:
    """In the order they were registered; retired ones only when asked for. ``after``:
    the previous page's last proxy id; ``limit`` -1: every one."""
    where, params = ("status = ?", (status.value,)) if status else ("status != 'retired'", ())
    if after is not None:
        where += " AND rowid > (SELECT rowid FROM proxies WHERE proxy_id = ?)"
        params = (*params, after)
    return await _views(
        db,
        f"SELECT {_COLUMNS} FROM proxies WHERE {where} ORDER BY rowid LIMIT ?",
        (*params, limit),
    )


async def get_proxy(db: aiosqlite.Connection, proxy_id: str) -> ProxyView | None:
    found = await _views(db, f"SELECT {_COLUMNS} FROM proxies WHERE proxy_id = ?", (proxy_id,))
    return found[0] if found else None


async def _views(db: aiosqlite.Connection, sql: str, params: tuple[object, ...]) -> list[ProxyView]:
    async with db.execute(sql, params) as cur:
        names = [column[0] for column in cur.description]
        rows = await cur.fetchall()
    views = []
    for row in rows:
        values = dict(zip(names, row, strict=True))
        values["bypass"] = msgspec.json.decode(values["bypass"])
        views.append(msgspec.convert(values, ProxyView, strict=False))
    return views
