"""Who is online: runner presence from the ``tb_runners`` KV bucket (TTL-expired = gone)."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import nats.js.errors
import structlog

from engine.bus import Bus
from schemas import subjects
from schemas.presence import RunnerPresence

log = structlog.get_logger("tb.presence")

_decode = msgspec.json.Decoder(RunnerPresence).decode
_reported: set[tuple[str, int]] = set()  # (key, revision): say it once, not on every read


async def online_runners(bus: Bus) -> list[RunnerPresence]:
    kv = await bus.kv(subjects.RUNNERS_BUCKET)
    found: list[RunnerPresence] = []
    for key in await bus.kv_keys(subjects.RUNNERS_BUCKET):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # deleted, or expired between listing and reading
        if entry.value:
            try:
                found.append(_decode(entry.value))
            except msgspec.DecodeError as err:  # not JSON, or not a presence: no runner
                if (key, entry.revision or 0) not in _reported:
                    if len(_reported) >= 1024:
                        _reported.clear()
                    _reported.add((key, entry.revision or 0))
                    log.warning("presence.undecodable", key=key, error=str(err))
    return found


def serving(runners: Iterable[RunnerPresence]) -> set[tuple[str, str]]:
    """The (os, browser) platforms that a runner takes new work for: present and not
    draining. A runner killed without deregistering stays in until its entry's TTL lapses."""
    return {(r.os, r.browser) for r in runners if r.status == "online"}


async def serving_platforms(bus: Bus) -> set[tuple[str, str]]:
    return serving(await online_runners(bus))
