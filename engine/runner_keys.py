"""Runner keys: what an admin hands to a runner, kept only as one-way digests.

A key reads ``<key_id>.<secret>``; the id finds the record without a scan, the secret
(256 random bits) proves possession. The bucket keeps the secret's SHA-256 (checked in
constant time) and a bcrypt hash of the NATS password derived from it, so neither the
key nor the password can be read back from anything stored; the runner derives its
password again from the key at every exchange. Revoking deletes the record (purged, so
no older value lingers), which removes the key's NATS user.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import bcrypt
import msgspec
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from engine.bus import Bus
from schemas import subjects
from schemas.ids import short_id, utcnow
from schemas.values import Platform

KEY_SEPARATOR = "."
PASSWORD_CONTEXT = b"tb-nats-password-v1"
# the passwords are 256-bit random values: no cost makes guessing them feasible or not,
# while nats-server checks every connected client's password again on each reload
BCRYPT_COST = 4


class RunnerKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    runner_id: str  # also the key's NATS user name
    key_sha256: str
    nats_password_bcrypt: str
    created_at: datetime
    created_by: str
    platform: Platform | None = None  # declared at the last exchange: its dispatch consumer


_decode_record = msgspec.json.Decoder(RunnerKeyRecord).decode


@dataclass(frozen=True)
class IssuedKey:
    record: RunnerKeyRecord
    key: str  # shown once


def password_for(secret: str) -> str:
    """The NATS password of a key's runner, derived from the key's secret."""
    return hmac.new(secret.encode(), PASSWORD_CONTEXT, hashlib.sha256).hexdigest()


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST)).decode()


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue(name: str, created_by: str) -> IssuedKey:
    key_id = short_id("rk")
    secret = secrets.token_urlsafe(32)
    record = RunnerKeyRecord(
        key_id=key_id,
        name=name,
        runner_id=f"runner_{key_id}",
        key_sha256=_sha256(secret),
        nats_password_bcrypt=bcrypt_hash(password_for(secret)),
        created_at=utcnow(),
        created_by=created_by,
    )
    return IssuedKey(record, f"{key_id}{KEY_SEPARATOR}{secret}")


def split_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else ``None``."""
    key_id, sep, secret = key.strip().partition(KEY_SEPARATOR)
    if not sep or not key_id or not secret or len(key) > 200:
        return None
    return key_id, secret


_DUMMY = _sha256("no such key")


def matches(record: RunnerKeyRecord | None, secret: str) -> bool:
    """Whether ``secret`` is the record's, in time that does not depend on where they
    differ, nor (much) on whether there was a record at all."""
    expected = record.key_sha256 if record is not None else _DUMMY
    same = hmac.compare_digest(_sha256(secret), expected)
    return same and record is not None


class RunnerKeys:
    """The ``tb_runner_keys`` bucket (one record per live key; revoked ones are purged)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self.bus)
        return self._kv

    async def add(self, record: RunnerKeyRecord) -> None:
        kv = await self.bucket()
        await kv.create(record.key_id, msgspec.json.encode(record))

    async def get(self, key_id: str) -> RunnerKeyRecord | None:
        found = await self._get(key_id)
        return found[0] if found is not None else None

    async def _get(self, key_id: str) -> tuple[RunnerKeyRecord, int] | None:
        """The record and its revision (for an update that must not revive a revoked key)."""
        kv = await self.bucket()
        try:
            entry = await kv.get(key_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not entry.value or entry.revision is None:
            return None
        try:
            return _decode_record(entry.value), entry.revision
        except msgspec.DecodeError:
            return None  # a record nobody can read is no key

    async def all(self) -> list[RunnerKeyRecord]:
        await self.bucket()  # the bucket exists
        keys = await self.bus.kv_keys(subjects.RUNNER_KEYS_BUCKET)
        found = [await self.get(key_id) for key_id in keys]
        return [record for record in found if record is not None]

    async def set_platform(
        self, record: RunnerKeyRecord, platform: Platform
    ) -> RunnerKeyRecord | None:
        """Bind the key's NATS user to ``platform``'s dispatch consumer; ``None`` when the
        key was revoked meanwhile (an update, never a put, so a revocation racing an
        exchange cannot bring the key back)."""
        kv = await self.bucket()
        for _ in range(5):
            found = await self._get(record.key_id)
            if found is None or found[0].key_sha256 != record.key_sha256:
                return None
            current, revision = found
            if current.platform == platform:
                return current
            changed = msgspec.structs.replace(current, platform=platform)
            try:
                await kv.update(record.key_id, msgspec.json.encode(changed), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another exchange of the same key, or a revocation: look again
            return changed
        return None

    async def remove(self, key_id: str) -> bool:
        """Purge the record; ``False`` when there was none."""
        if await self.get(key_id) is None:
            return False
        kv = await self.bucket()
        await kv.purge(key_id)
        return True


async def open_bucket(bus: Bus) -> KeyValue:
    config = KeyValueConfig(
        bucket=subjects.RUNNER_KEYS_BUCKET,
        history=1,
        replicas=bus.config.replicas,
        storage=StorageType.FILE,
    )
    with contextlib.suppress(nats.js.errors.BadRequestError):
        await bus.js.create_key_value(config)
    return await bus.kv(subjects.RUNNER_KEYS_BUCKET)


async def watch_records(bus: Bus) -> AsyncIterator[dict[str, RunnerKeyRecord]]:
    """Every live key, now and after each change (the first value once the bucket's
    current content has been read)."""
    kv = await open_bucket(bus)
    watcher = await kv.watchall()
    records: dict[str, RunnerKeyRecord] = {}
    initial = True
    try:
        async for entry in watcher:
            if entry is None:  # the end of what the bucket held when the watch began
                initial = False
                yield dict(records)
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                records.pop(entry.key, None)
            else:
                with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                    records[entry.key] = _decode_record(entry.value)
            if not initial:
                yield dict(records)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
