"""The proxy secrets bucket: each proxy's endpoint with its credentials, keyed by proxy id.

History 1: a proxy's credentials are written once, when it is registered, and purged when
it is retired; no older value is kept. The bucket is not part of the event log, so the
log never holds a password. Any process of the system can read it today; identity (users
and per-process NATS permissions) will make it readable by runners and the engine only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from engine.bus import Bus
from schemas import subjects
from schemas.proxies import ProxyEndpoint, decode_secret, encode_secret


class SecretTaken(Exception):
    """Another endpoint is already stored under this proxy id."""


@dataclass
class ProxySecrets:
    bus: Bus
    _kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            config = KeyValueConfig(
                bucket=subjects.PROXY_SECRETS_BUCKET,
                history=1,
                replicas=self.bus.config.replicas,
                storage=StorageType.FILE,
            )
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.bus.js.create_key_value(config)
            self._kv = await self.bus.kv(subjects.PROXY_SECRETS_BUCKET)
        return self._kv

    async def store(self, proxy_id: str, endpoint: ProxyEndpoint) -> None:
        """Store the endpoint under a new id; storing the same endpoint again is a no-op
        (a retried registration), another one is ``SecretTaken``."""
        kv = await self.bucket()
        try:
            await kv.create(proxy_id, encode_secret(endpoint))
        except nats.js.errors.KeyWrongLastSequenceError:
            if await self.get(proxy_id) != endpoint:
                raise SecretTaken(proxy_id) from None

    async def get(self, proxy_id: str) -> ProxyEndpoint | None:
        kv = await self.bucket()
        try:
            entry = await kv.get(proxy_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_secret(entry.value or b"")

    async def purge(self, proxy_id: str) -> None:
        kv = await self.bucket()
        await kv.purge(proxy_id)
