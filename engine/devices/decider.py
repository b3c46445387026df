"""Which device catalogue version is in use, as a pure decider: ``decide(state, cmd, meta)``,
``evolve(state, event, seq)``.

Versions only move forward. A fresh system's first start takes the newest version it
ships, once: whoever starts later finds one in use and takes nothing, so a package
upgrade never switches devices by itself. After that a newer shipped version is only
offered, until an admin takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from engine.errors import Conflict
from schemas.device_catalogue import CatalogueVersion
from schemas.events import DeviceCatalogueAdopted, Event


@dataclass(frozen=True)
class Meta:
    id: str
    at: datetime
    actor: str


@dataclass(frozen=True)
class InUse:
    """The version in use (``version`` 0: none yet) and where its adoption is in the log."""

    version: int = 0
    sha256: str = ""
    source: str = ""
    adopted_at: datetime | None = None
    adopted_by: str = ""
    seq: int = 0  # stream sequence of the last adoption: what the next one expects

    @property
    def ref(self) -> CatalogueVersion | None:
        return CatalogueVersion(self.version, self.sha256) if self.version else None


@dataclass(frozen=True)
class AdoptCatalogue:
    """Take a shipped version (the newest this process has). ``first_start``: only when
    none is in use yet; otherwise only when it is newer than the one in use."""

    version: int
    sha256: str
    source: str
    first_start: bool = False


def decide(state: InUse, cmd: AdoptCatalogue, meta: Meta) -> list[DeviceCatalogueAdopted]:
    if cmd.first_start and state.version:
        return []
    if cmd.version == state.version and cmd.sha256 != state.sha256:
        raise Conflict(
            "version",
            f"version {cmd.version} is in use with other content than this server's"
            f" (sha256 {state.sha256[:12]}…, this server's {cmd.sha256[:12]}…)",
        )
    if cmd.version <= state.version:
        raise Conflict(
            "version",
            f"nothing newer to take: version {state.version} is in use and the newest"
            f" this server ships is version {cmd.version}",
        )
    adopted = DeviceCatalogueAdopted(
        id=meta.id,
        at=meta.at,
        actor=meta.actor,
        version=cmd.version,
        sha256=cmd.sha256,
        source=cmd.source,
        previous=state.version,
    )
    return [adopted]


def evolve(state: InUse, event: Event, seq: int = 0) -> InUse:
    """Fold one event in; an adoption of a version not newer than the one in use changes
    nothing (the log holds none, the concurrency check sees to it)."""
    if not isinstance(event, DeviceCatalogueAdopted) or event.version <= state.version:
        return replace(state, seq=max(state.seq, seq))
    return InUse(
        version=event.version,
        sha256=event.sha256,
        source=event.source,
        adopted_at=event.at,
        adopted_by=event.actor,
        seq=max(state.seq, seq),
    )


def fold(events: list[tuple[int, Event]]) -> InUse:
    state = InUse()
    for seq, event in events:
        state = evolve(state, event, seq)
    return state
