"""How deep each platform's work queue is: the pending count of its dispatch consumer."""

from __future__ import annotations

from engine.bus import Bus
from schemas import subjects


async def dispatch_queue_depths(bus: Bus) -> dict[tuple[str, str], int]:
    """``(os, browser)`` -> work items stored and not yet delivered to a runner, for every
    platform that has a dispatch consumer."""
    depths: dict[tuple[str, str], int] = {}
    for info in await bus.js.consumers_info(subjects.EVENTS_STREAM):
        platform = subjects.dispatch_platform(info.config.filter_subject or "")
        if platform is None or info.name != subjects.dispatch_consumer(*platform):
            continue
        depths[platform] = int(info.num_pending or 0)
    return depths
