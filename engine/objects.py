"""Removing an object from a JetStream object store so that nothing of it stays.

``ObjectStore.delete`` publishes a "deleted" marker under the object's name before it
purges the chunks: a process that dies in between leaves the chunks, and the marker
hides the object from a second ``delete``. Here the chunks are purged first (by the id
the object's meta names, deleted or not), then the meta: each step may run again, so a
removal cut short anywhere is finished by doing it again.
"""

from __future__ import annotations

import base64

import nats.js.errors
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from engine.bus import Bus


async def remove_object(bus: Bus, bucket: str, name: str) -> bool:
    """Remove ``name`` from ``bucket``, chunks and meta; ``False`` when nothing of it was
    there (idempotent)."""
    store = await bus.js.object_store(bucket)
    stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    meta = OBJ_META_PRE_TEMPLATE.format(
        bucket=bucket, obj=base64.urlsafe_b64encode(name.encode()).decode()
    )
    try:
        info = await store.get_info(name, show_deleted=True)
    except nats.js.errors.ObjectNotFoundError:
        return False
    except nats.js.errors.BadObjectMetaError:
        info = None  # no chunks can be found by it: the meta still goes
    if info is not None and info.nuid:
        chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
        await bus.js.purge_stream(stream, subject=chunks)
    await bus.js.purge_stream(stream, subject=meta)
    return True
