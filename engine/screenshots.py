"""Reading failure screenshots: the FlowFailed of an attempt names its object in
``tb_screenshots`` (runners write it there before they report the failure)."""

from __future__ import annotations

import nats.js.errors

from engine.bus import Bus
from engine.errors import NotFound
from schemas import subjects
from schemas.events import FlowFailed


async def failure_screenshot(
    bus: Bus, job_id: str, flow_id: str, attempt: int | None = None
) -> bytes:
    """The PNG the FlowFailed of ``attempt`` names (default: the latest attempt that
    failed); ``NotFound`` says what is missing."""
    failures = [
        env.event
        for env in await bus.load(subjects.flow_subject(job_id, "FlowFailed"))
        if isinstance(env.event, FlowFailed) and env.event.flow_id == flow_id
    ]
    if attempt is None:
        if not failures:
            raise NotFound("flow_id", f"flow {flow_id} has no failed attempt")
        attempt = max(f.attempt for f in failures)
    failures = [f for f in failures if f.attempt == attempt]
    if not failures:
        raise NotFound("attempt", f"flow {flow_id} has no failure recorded for attempt {attempt}")
    named = [f.screenshot for f in failures if f.screenshot]
    if not named:
        raise NotFound(
            "screenshot",
            f"the failure of flow {flow_id} attempt {attempt} ({failures[-1].reason}) "
            "has no screenshot",
        )
    name = named[-1]
    try:
        store = await bus.js.object_store(subjects.SCREENSHOTS_BUCKET)
        found = await store.get(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
        raise NotFound(
            "screenshot", f"{name} is no longer in the {subjects.SCREENSHOTS_BUCKET} bucket"
        ) from None
    except nats.js.errors.BucketNotFoundError:
        raise NotFound(
            "screenshot", f"there is no {subjects.SCREENSHOTS_BUCKET} bucket (not provisioned)"
        ) from None
    return bytes(found.data or b"")
