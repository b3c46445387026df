"""What a running job waits for, said in its ``detail``: a platform no runner serves now.

Presence is not in the event log (it is a heartbeat with a TTL), so this is read when
the job is, from the presence bucket: the job's work items wait in their platform's
queue and the job continues as soon as a runner of that platform is back.
"""

from __future__ import annotations

import msgspec
import nats.errors
import structlog

from engine.bus import Bus
from engine.presence import serving_platforms
from projections.queries import JobView
from schemas.values import JobStatus

log = structlog.get_logger("tb.api")


def waiting_detail(os_name: str, browser: str) -> str:
    return f"waiting for a runner for {os_name}/{browser}"


async def with_waiting_detail(bus: Bus, views: list[JobView]) -> list[JobView]:
    """``views`` with ``detail`` set on each running job whose platform no runner serves."""
    if not any(v.status == JobStatus.RUNNING for v in views):
        return views
    try:
        serving = await serving_platforms(bus)
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
