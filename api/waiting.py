"""What a running job waits for, said in its ``detail``: a platform no runner serves now.

Presence is not in the event log (it is a heartbeat with a TTL), so this is read when
the job is, from the presence bucket: the job's work items wait in their platform's
queue and the job continues as soon as a runner of that platform is back. One read of
the bucket answers the job reads of the next second (a runner's entry lives for its
TTL anyway): under many readers the bucket is read once a second, not per request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import msgspec
import nats.errors
import structlog

from engine.bus import Bus
from engine.presence import serving_platforms
from projections.queries import JobView
from schemas.values import JobStatus

log = structlog.get_logger("tb.api")

FRESH_FOR = 1.0  # seconds one presence read answers the job reads after it


@dataclass
class _Read:
    at: float
    platforms: asyncio.Future[set[tuple[str, str]]]


_reads: WeakKeyDictionary[Bus, _Read] = WeakKeyDictionary()


async def recently_serving(bus: Bus) -> set[tuple[str, str]]:
    """``serving_platforms`` as read at most ``FRESH_FOR`` seconds ago; concurrent callers
    share one read, and a read that failed is not kept."""
    now = asyncio.get_running_loop().time()
    read = _reads.get(bus)
    stale = read is None or now - read.at > FRESH_FOR
    if read is not None and read.platforms.done():
        stale = stale or read.platforms.cancelled() or read.platforms.exception() is not None
    if stale or read is None:
        read = _Read(now, asyncio.ensure_future(serving_platforms(bus)))
        _reads[bus] = read
    return await asyncio.shield(read.platforms)


def waiting_detail(os_name: str, browser: str) -> str:
    return f"waiting for a runner for {os_name}/{browser}"


async def with_waiting_detail(bus: Bus, views: list[JobView]) -> list[JobView]:
    """``views`` with ``detail`` set on each running job whose platform no runner serves."""
    if not any(v.status == JobStatus.RUNNING for v in views):
        return views
    try:
        serving = await recently_serving(bus)
    except nats.errors.Error as err:  # the job's own state still reads: say nothing extra
        log.warning("jobs.presence_unavailable", error=str(err))
        return views
    return [
        msgspec.structs.replace(v, detail=waiting_detail(v.platform_os, v.platform_browser))
        if v.status == JobStatus.RUNNING
        and v.kind == "flows"  # an external job's worker is no runner
        and (v.platform_os, v.platform_browser) not in serving
        and v.detail is None
        else v
        for v in views
    ]
