"""Dataset commands at the edge: load the aggregate, decide, append with optimistic
concurrency; each command's events carry ``command_msg_id(command_id, n)``, so a retried
command dedupes (by msg-id in the window, by ``applied_by`` after it) while another
command at the same version conflicts and is decided again."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from engine.bus import Appended, Bus, Expect, applied_by, retry_on_conflict
from engine.datasets.decider import Dataset, DatasetCommand, Meta, decide, fold
from engine.errors import Invalid, NotFound
from schemas import subjects
from schemas.events import DatasetEvent, DatasetVersionUploaded, Envelope
from schemas.ids import ID_RULE, is_valid_id, new_id, utcnow


def checked_dataset_id(dataset_id: str) -> str:
    """The id, if it is one: it becomes a subject token (``tb.dataset.<id>.*``)."""
    if not is_valid_id(dataset_id):
        raise Invalid("dataset_id", ID_RULE)
    return dataset_id


def dataset_id_for(command_id: str) -> str:
    """The dataset a keyed create makes: a retry of that create names the same dataset."""
    return f"ds_{hashlib.blake2b(command_id.encode(), digest_size=10).hexdigest()}"


@dataclass
class DatasetCommands:
    bus: Bus
    clock: Callable[[], datetime] = utcnow

    async def history(self, dataset_id: str) -> list[Envelope]:
        return await self.bus.load(subjects.dataset_stream_filter(checked_dataset_id(dataset_id)))

    async def load(self, dataset_id: str) -> Dataset:
        return fold(_events(await self.history(dataset_id)))

    async def version(self, dataset_id: str, version: int) -> DatasetVersionUploaded:
        """Where version ``version`` of a dataset is stored (deleted datasets included: a
        job that used a version can still be read back)."""
        for env in await self.history(dataset_id):
            if isinstance(env.event, DatasetVersionUploaded) and env.event.version == version:
                return env.event
        raise NotFound("version", f"dataset {dataset_id} has no version {version}")

    async def stored_by(self, dataset_id: str, command_id: str) -> DatasetVersionUploaded:
        """The version a command stored (a retried command finds the same one)."""
        prefix = subjects.command_msg_id(command_id, 0).removesuffix("0")
        for env in await self.history(dataset_id):
            if isinstance(env.event, DatasetVersionUploaded) and env.msg_id.startswith(prefix):
                return env.event
        raise NotFound("version", f"no version of dataset {dataset_id} stored by this command")

    async def execute(
        self, cmd: DatasetCommand, actor: str, command_id: str | None = None
    ) -> tuple[Dataset, Appended]:
        """Read-decide-append; a retried command answers what it stored the first time."""
        command = command_id or new_id()

        async def attempt() -> tuple[Dataset, Appended]:
            envelopes = await self.history(cmd.dataset_id)
            dataset = fold(_events(envelopes))
            before = applied_by(envelopes, command)
            if before is not None:
                return dataset, before
            meta = Meta(ids=(new_id(), new_id()), at=self.clock(), actor=actor)
            scope = subjects.dataset_stream_filter(cmd.dataset_id)
            expected = dataset.version
            appended = Appended(seq=dataset.version, duplicate=False)
            for n, event in enumerate(decide(dataset, cmd, meta)):
                appended = await self.bus.append(
                    event,
                    msg_id=subjects.command_msg_id(command, n),
                    expect=Expect(scope, expected),
                )
                expected = appended.seq
            return await self.load(cmd.dataset_id), appended

        return await retry_on_conflict(attempt)


def _events(envelopes: list[Envelope]) -> list[tuple[int, DatasetEvent]]:
    return [(env.seq, env.event) for env in envelopes if isinstance(env.event, DatasetEvent)]
