"""Runners, their status since they started, and the platforms they make available now.

Presence (the ``tb_runners`` bucket, entries expire after their TTL) says who is there
now: their load and last heartbeat. The read model says who ever registered and counts
each runner's flow runs from the log (``FlowDone``/``FlowFailed`` naming it, since its
last ``RunnerRegistered``), so the counts survive the API, and a runner that vanished.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency, Provide

from api.authz import access
from api.deps import services_from_state
from api.dto import AvailablePlatform
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.services import Services
from engine.presence import online_runners
from projections import queries
from projections.queries import RunnerView
from schemas.ids import utcnow
from schemas.presence import RunnerPresence


class RunnerOut(msgspec.Struct, kw_only=True):
    """A runner present now; ``online`` is false while it drains (it takes no new work)."""

    id: str
    os: str
    browser: str
    browser_version: str  # as its launched browser reports it; "" for a browserless runner
    capacity: int  # flows it runs at once
    labels: dict[str, str]
    version: str
    hostname: str
    status: Literal["online", "draining"]
    online: bool
    in_flight: int
    last_heartbeat: datetime | None


class RunnerStatusOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every runner that registered: ``offline`` ones went without deregistering (killed,
    cut off) and their presence lapsed. Counts are flow runs since its last start."""

    id: str
    os: str
    browser: str
    browser_version: str
    capacity: int
    labels: dict[str, str]
    version: str
    hostname: str
    status: Literal["online", "draining", "offline", "deregistered"]
    online: bool
    in_flight: int
    flows_completed: int
    flows_failed: int
    started_at: datetime | None
    uptime_seconds: float | None
    last_heartbeat: datetime | None
    reason: str | None = None


class RunnerController(Controller):
    path = "/api/v1/runners"
    opt = access("viewer")
    tags = ["runners"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/",
        summary="Runners present now (presence heartbeat within its TTL), by id, a page at a time",
        responses=problems(400, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def list_runners(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response[list[RunnerOut]]:
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        runners = [
            present(p)
            for p in await online_runners(services.bus)
            if after is None or p.runner_id > after
        ]
        return page(request, runners[: limit + 1], limit, lambda runner: (runner.id,))

    @get(
        "/status",
        summary="Every runner: flows completed and failed since its start, uptime, labels, "
        "in-flight flows, last heartbeat; by id, a page at a time",
        responses=problems(400, 409, 503),
        response_headers=PAGE_HEADERS,
    )
    async def runner_status(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Response[list[RunnerStatusOut]]:
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        presence = {p.runner_id: p for p in await online_runners(services.bus)}
        known = {r.runner_id: r for r in await queries.list_runners(services.db)}
        now = utcnow()
        ids = sorted(i for i in presence.keys() | known.keys() if after is None or i > after)
        runners = [status_of(presence.get(i), known.get(i), now) for i in ids[: limit + 1]]
        return page(request, runners, limit, lambda runner: (runner.id,))

    @get("/available-platforms", summary="Platforms with a runner online now")
    async def available_platforms(
        self, services: NamedDependency[Services]
    ) -> list[AvailablePlatform]:
        platforms: dict[tuple[str, str], AvailablePlatform] = {}
        for runner in await online_runners(services.bus):
            if runner.status != "online":
                continue
            key = (runner.os, runner.browser)
            seen = platforms.get(key, AvailablePlatform(runner.os, runner.browser, 0, 0))
            platforms[key] = AvailablePlatform(
                runner.os, runner.browser, seen.runners + 1, seen.slots + runner.slots
            )
        return [platforms[k] for k in sorted(platforms)]


def present(p: RunnerPresence) -> RunnerOut:
    return RunnerOut(
        id=p.runner_id,
        os=p.os,
        browser=p.browser,
        browser_version=p.browser_version,
        capacity=p.slots,
        labels=p.labels,
        version=p.version,
        hostname=p.hostname,
        status="draining" if p.status == "draining" else "online",
        online=p.status == "online",
        in_flight=p.running,
        last_heartbeat=parse_time(p.last_heartbeat),
    )


def status_of(p: RunnerPresence | None, r: RunnerView | None, now: datetime) -> RunnerStatusOut:
    """One runner's status from its presence (if present) and its read-model row (if
    projected yet); at least one of them is there."""
    if p is not None:
        live = present(p)
        # a runner that registered again may be ahead of the read model: its own start wins
        started = parse_time(p.started_at) or (r.registered_at if r else None)
        return RunnerStatusOut(
            id=live.id,
            os=live.os,
            browser=live.browser,
            browser_version=live.browser_version,
            capacity=live.capacity,
            labels=live.labels,
            version=live.version,
            hostname=live.hostname,
            status=live.status,
            online=live.online,
            in_flight=live.in_flight,
            flows_completed=r.flows_completed if r else 0,
            flows_failed=r.flows_failed if r else 0,
            started_at=started,
            uptime_seconds=round((now - started).total_seconds(), 3) if started else None,
            last_heartbeat=live.last_heartbeat,
        )
    assert r is not None
    return RunnerStatusOut(
        id=r.runner_id,
        os=r.os,
        browser=r.browser,
        browser_version=r.browser_version,
        capacity=r.slots,
        labels=r.labels,
        version=r.version,
        hostname=r.hostname,
        status="deregistered" if r.status == "deregistered" else "offline",
        online=False,
        in_flight=0,
        flows_completed=r.flows_completed,
        flows_failed=r.flows_failed,
        started_at=r.registered_at,
        uptime_seconds=None,
        last_heartbeat=None,
        reason=r.reason,
    )


def parse_time(text: str) -> datetime | None:
    """A presence timestamp (ISO 8601 with offset); None when missing or not one."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else None
