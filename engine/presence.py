"""Who is online: runner presence from the ``tb_runners`` KV bucket (TTL-expired = gone)."""

from __future__ import annotations

import msgspec
import nats.js.errors

from engine.bus import Bus
from schemas import subjects
from schemas.presence import RunnerPresence

_decode = msgspec.json.Decoder(RunnerPresence).decode


async def online_runners(bus: Bus) -> list[RunnerPresence]:
    kv = await bus.kv(subjects.RUNNERS_BUCKET)
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    found: list[RunnerPresence] = []
    for key in sorted(keys):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # expired between listing and reading
        if entry.value:
            try:
                found.append(_decode(entry.value))
            except msgspec.ValidationError:
                continue
    return found
