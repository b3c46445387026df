"""The identity buckets: credentials, sessions and API keys live beside the log, never in it."""

from __future__ import annotations

import contextlib

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from engine.bus import Bus

CREDENTIALS_BUCKET = "tb_credentials"  # argon2id hash of each user's password, by user id
SESSIONS_BUCKET = "tb_sessions"  # live sessions, by sha256 of their token
API_KEYS_BUCKET = "tb_api_keys"  # API keys (sha256 of the secret), by key id


async def bucket(bus: Bus, name: str) -> KeyValue:
    config = KeyValueConfig(
        bucket=name, history=1, replicas=bus.config.replicas, storage=StorageType.FILE
    )
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await bus.js.create_key_value(config)
    return await bus.kv(name)
