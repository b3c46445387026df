"""Chunked, resumable uploads, kept in NATS so any API replica serves any chunk.

An upload is a KV entry in ``tb_uploads`` (what is coming: name, kind, format, size,
sha256, chunk size, owner, when it was last touched) and one object per chunk in the
``tb_uploads`` object store (``<upload_id>/<index>``). A chunk is stored whole or not at
all (the object store writes its metadata last), so sending a chunk again is harmless.
An upload idle longer than its lifetime is removed with its chunks by ``sweep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from engine.bus import Bus
from engine.datasets.columns import check_format
from engine.datasets.tables import Problem
from engine.errors import CommandIdReused, Conflict, Invalid, NotFound, Rejected
from engine.objects import remove_object
from schemas import subjects
from schemas.events import DatasetFormat, DatasetKind
from schemas.ids import new_id, utcnow

log = structlog.get_logger("tb.uploads")

MiB = 1024 * 1024


@dataclass(frozen=True)
class UploadsConfig:
    """``max_size`` (TB_UPLOAD_MAX_SIZE): the largest file; ``chunk_size``
    (TB_UPLOAD_CHUNK_SIZE): every chunk but the last has exactly this many bytes;
    ``lifetime`` (TB_UPLOAD_LIFETIME, seconds): an upload untouched this long is removed;
    ``import_max_size``: the largest file a single-request import takes."""

    max_size: int = 1024 * MiB
    chunk_size: int = 8 * MiB
    lifetime: float = 24 * 3600.0
    sweep_every: float = 60.0
    import_max_size: int = 4 * MiB
    finish_claim: float = 3600.0  # seconds a finish may take before another may take over


class _Settled(Exception):
    def __init__(self, upload: Upload) -> None:
        self.upload = upload


class _Busy(Exception):
    def __init__(self, upload: Upload) -> None:
        self.upload = upload


def _claimed(now: datetime, until: datetime, upload: Upload) -> Upload:
    if upload.finished is not None:
        raise _Settled(upload)
    if upload.finishing_until is not None and upload.finishing_until > now:
        raise _Busy(upload)
    return msgspec.structs.replace(upload, touched_at=now, finishing_until=until)


class Finished(msgspec.Struct, frozen=True):
    dataset_id: str
    version: int
    rows: int
    warnings: list[Problem] = []
    seq: int = 0  # the version's stream sequence: reads can wait for it


class Upload(msgspec.Struct, frozen=True, kw_only=True):
    upload_id: str
    owner: str
    name: str
    kind: DatasetKind
    format: DatasetFormat
    size: int
    sha256: str
    chunk_size: int
    created_at: datetime
    touched_at: datetime
    dataset_id: str | None = None  # a new version of this dataset, else a new dataset
    finished: Finished | None = None
    finishing_until: datetime | None = None  # a finish in progress holds it until then

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def chunk_length(self, index: int) -> int:
        if index < self.chunks - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (self.chunks - 1)

    def expires_at(self, lifetime: float) -> datetime:
        return self.touched_at + timedelta(seconds=lifetime)


_decode_stored_upload = msgspec.json.Decoder(Upload).decode


def _decode_upload(value: bytes, upload_id: str = "") -> Upload:
    """The stored upload; one nobody can read is refused like one that is gone."""
    try:
        return _decode_stored_upload(value)
    except msgspec.DecodeError:
        raise NotFound("upload_id", f"upload {upload_id} is unreadable: start it again") from None


@dataclass
class Uploads:
    bus: Bus
    config: UploadsConfig = UploadsConfig()
    clock: Callable[[], datetime] = utcnow
    _kv: KeyValue | None = None
    _store: ObjectStore | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            config = KeyValueConfig(
                bucket=subjects.UPLOADS_BUCKET,
                history=1,
                replicas=self.bus.config.replicas,
                storage=StorageType.FILE,
            )
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.bus.js.create_key_value(config)
            self._kv = await self.bus.kv(subjects.UPLOADS_BUCKET)
        return self._kv

    async def _chunks(self) -> ObjectStore:
        if self._store is None:
            config = ObjectStoreConfig(replicas=self.bus.config.replicas, storage=StorageType.FILE)
            with contextlib.suppress(nats.js.errors.BadRequestError):
                await self.bus.js.create_object_store(subjects.UPLOADS_BUCKET, config=config)
            self._store = await self.bus.js.object_store(subjects.UPLOADS_BUCKET)
        return self._store

    async def start(
        self,
        *,
        owner: str,
        name: str,
        kind: DatasetKind,
        fmt: DatasetFormat,
        size: int,
        sha256: str,
        dataset_id: str | None = None,
        command_id: str | None = None,
    ) -> Upload:
        """A new upload; with a ``command_id`` (the caller's idempotency key) a retried
        start answers the upload the first one made."""
        check_format(kind, fmt)
        if size > self.config.max_size:
            raise Rejected("size", f"must be at most {self.config.max_size} bytes")
        now = self.clock()
        key = f"{owner}\n{command_id or new_id()}".encode()
        upload_id = f"up_{hashlib.blake2b(key, digest_size=10).hexdigest()}"
        upload = Upload(
            upload_id=upload_id,
            owner=owner,
            name=name,
            kind=kind,
            format=fmt,
            size=size,
            sha256=sha256,
            chunk_size=self.config.chunk_size,
            created_at=now,
            touched_at=now,
            dataset_id=dataset_id,
        )
        kv = await self._bucket()
        try:
            await kv.create(upload.upload_id, msgspec.json.encode(upload))
        except nats.js.errors.KeyWrongLastSequenceError:
            before = await self.get(upload.upload_id)
            asked = (name, kind, fmt, size, sha256, dataset_id)
            if (before.name, before.kind, before.format, before.size, before.sha256,
                    before.dataset_id) != asked:  # fmt: skip
                raise CommandIdReused("another upload") from None
            return before
        return upload

    async def get(self, upload_id: str) -> Upload:
        kv = await self._bucket()
        try:
            entry = await kv.get(upload_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            raise NotFound(
                "upload_id", f"no upload {upload_id} (finished long ago, expired or never started)"
            ) from None
        return _decode_upload(entry.value or b"", upload_id)

    async def _change(self, upload_id: str, change: Callable[[Upload], Upload]) -> Upload:
        """Apply ``change`` to the upload as stored, retrying when another replica wrote
        in between (``change`` may raise to refuse)."""
        kv = await self._bucket()
        for _ in range(20):
            try:
                entry = await kv.get(upload_id)
            except nats.js.errors.KeyNotFoundError:
                raise NotFound("upload_id", f"no upload {upload_id}") from None
            changed = change(_decode_upload(entry.value or b"", upload_id))
            try:
                await kv.update(upload_id, msgspec.json.encode(changed), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return changed
        raise Conflict("upload_id", "too many concurrent writes to this upload, retry")

    async def _touch(self, upload_id: str) -> Upload:
        now = self.clock()
        return await self._change(
            upload_id, lambda upload: msgspec.structs.replace(upload, touched_at=now)
        )

    async def claim_finish(self, upload_id: str) -> Upload:
        """The upload, now this request's to finish; a finished one as it is. While another
        request finishes it, wait for that one's answer (or for its claim to lapse)."""
        while True:
            now = self.clock()
            until = now + timedelta(seconds=self.config.finish_claim)
            try:
                return await self._change(upload_id, functools.partial(_claimed, now, until))
            except _Settled as settled:
                return settled.upload
            except _Busy as busy:
                await self._wait_while_finishing(busy.upload)

    async def _wait_while_finishing(self, upload: Upload) -> None:
        assert upload.finishing_until is not None
        left = (upload.finishing_until - self.clock()).total_seconds()
        kv = await self._bucket()
        watcher = await kv.watch(upload.upload_id)
        try:
            async with asyncio.timeout(max(left, 0.0) + 1.0):
                async for entry in watcher:
                    if entry is None or entry.value is None:
                        if entry is not None and entry.operation is not None:
                            return  # removed: the claim's retry says so
                        continue
                    try:
                        now = _decode_stored_upload(entry.value)
                    except msgspec.DecodeError:
                        return  # unreadable: the claim's retry says so
                    if now.finished is not None or now.finishing_until is None:
                        return
        except TimeoutError:
            return  # the claim lapsed: its holder is gone
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def release_finish(self, upload_id: str) -> None:
        """A finish that failed (bad rows, a wrong sha256) lets the next one try."""
        with contextlib.suppress(NotFound):
            await self._change(
                upload_id,
                lambda upload: msgspec.structs.replace(upload, finishing_until=None),
            )

    async def put_chunk(self, upload: Upload, index: int, data: bytes) -> None:
        if upload.finished is not None:
            raise Conflict("upload_id", "upload is finished")
        if not 0 <= index < upload.chunks:
            raise Invalid("index", f"must be 0-{upload.chunks - 1} for this upload")
        want = upload.chunk_length(index)
        if len(data) != want:
            raise Invalid("body", f"chunk {index} must be {want} bytes (got {len(data)})")
        store = await self._chunks()
        await store.put(subjects.upload_chunk_name(upload.upload_id, index), data)
        try:
            touched = await self._touch(upload.upload_id)
        except NotFound:
            touched = None  # swept meanwhile
        if touched is None or touched.finished is not None:
            # the upload went (or was finished) while the chunk was stored: no chunk may
            # outlive its upload, the sweeper would never find it
            await self._drop_chunk(upload.upload_id, index)
            if touched is None:
                raise NotFound("upload_id", f"no upload {upload.upload_id}")
            raise Conflict("upload_id", "upload is finished")

    async def received(self, upload: Upload) -> list[int]:
        store = await self._chunks()

        async def has(index: int) -> bool:
            try:
                await store.get_info(subjects.upload_chunk_name(upload.upload_id, index))
            except nats.js.errors.NotFoundError:
                return False
            return True

        found = await asyncio.gather(*(has(i) for i in range(upload.chunks)))
        return [i for i, ok in enumerate(found) if ok]

    async def assemble(self, upload: Upload, out: BinaryIO) -> None:
        """Write every chunk, in order, to ``out``; refuse when one is missing or the whole
        does not hash to the upload's sha256."""
        have = set(await self.received(upload))
        missing = [i for i in range(upload.chunks) if i not in have]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" …" if len(missing) > 20 else "")
            raise Conflict("chunks", f"{len(missing)} chunk(s) not received yet: {shown}")
        store = await self._chunks()
        digest = hashlib.sha256()
        size = 0
        for index in range(upload.chunks):
            result = await store.get(subjects.upload_chunk_name(upload.upload_id, index))
            data = result.data or b""
            digest.update(data)
            size += len(data)
            out.write(data)
        if size != upload.size:
            raise Rejected("size", f"the chunks hold {size} bytes, not {upload.size}")
        if digest.hexdigest() != upload.sha256:
            raise Rejected("sha256", "does not match the chunks received: send them again")

    async def finish(self, upload: Upload, finished: Finished) -> None:
        """Record the answer (a retried finish gets it again) and drop the chunks."""
        now = self.clock()
        await self._change(
            upload.upload_id,
            lambda stored: msgspec.structs.replace(
                stored, touched_at=now, finished=finished, finishing_until=None
            ),
        )
        await self._drop_chunks(upload)

    async def _drop_chunks(self, upload: Upload) -> None:
        for index in range(upload.chunks):
            await self._drop_chunk(upload.upload_id, index)

    async def _drop_chunk(self, upload_id: str, index: int) -> None:
        await self._chunks()  # the bucket exists
        name = subjects.upload_chunk_name(upload_id, index)
        await remove_object(self.bus, subjects.UPLOADS_BUCKET, name)

    async def remove(self, upload: Upload) -> None:
        await self._drop_chunks(upload)
        kv = await self._bucket()
        await kv.purge(upload.upload_id)

    async def sweep(self) -> list[str]:
        """Remove every upload idle longer than the lifetime; the ids removed."""
        await self._bucket()  # the bucket exists
        keys = await self.bus.kv_keys(subjects.UPLOADS_BUCKET)
        now = self.clock()
        removed = []
        for key in keys:
            try:
                upload = await self.get(key)
            except NotFound:
                continue
            if upload.expires_at(self.config.lifetime) <= now:
                await self.remove(upload)
                log.info("upload.expired", upload_id=key, touched_at=upload.touched_at.isoformat())
                removed.append(key)
        return removed

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.config.sweep_every, self.config.lifetime / 4))
            try:
                await self.sweep()
            except (nats.errors.Error, nats.js.errors.Error) as err:
                log.warning("upload.sweep_failed", error=str(err))
