"""Failure screenshots into the ``tb_screenshots`` object store, named by the delivery.

The name (``<flow_id>/<attempt>/<delivery>.png``) goes into the flow's FlowFailed; a
screenshot that cannot be stored costs the failure its picture, never its report.
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog

from agents.intake import Work
from engine.bus import Bus
from schemas import subjects

log = structlog.get_logger("tb.agent")

STORE_TIMEOUT = 5.0  # seconds a screenshot may take to store before the failure goes without


async def store_screenshot(bus: Bus, work: Work, png: bytes) -> str | None:
    """Store ``png`` for this delivery; its object name, or ``None`` when it was not stored."""
    item = work.item
    name = subjects.screenshot_name(item.flow_id, item.attempt, work.delivery)
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            store = await bus.js.object_store(subjects.SCREENSHOTS_BUCKET)
            await store.put(name, png)
    except (nats.errors.Error, TimeoutError) as err:
        log.warning("flow.screenshot_not_stored", flow_id=item.flow_id, name=name, error=str(err))
        return None
    return name
