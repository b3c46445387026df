"""Device catalogue commands at the edge: read the adoptions, decide, append with
optimistic concurrency on ``tb.catalogue.devices.*`` and the version's own msg-id, so
two engines starting together, or two admins taking the same version, store it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from engine.bus import Bus, Expect, retry_on_conflict
from engine.devices.decider import AdoptCatalogue, InUse, Meta, decide, fold
from engine.errors import Conflict
from schemas import subjects
from schemas.device_catalogue import CatalogueVersion, DeviceCatalogue, ShippedCatalogues
from schemas.ids import new_id, utcnow

SYSTEM = "system"


@dataclass
class DeviceCatalogues:
    bus: Bus
    shipped: ShippedCatalogues = field(default_factory=ShippedCatalogues)
    clock: Callable[[], datetime] = utcnow

    async def state(self) -> InUse:
        envelopes = await self.bus.load(subjects.DEVICE_CATALOGUE)
        return fold([(env.seq, env.event) for env in envelopes])

    async def adopt_at_first_start(self) -> InUse:
        """The version in use; on a fresh system the newest shipped one, adopted now."""
        return await self._adopt(SYSTEM, first_start=True)

    async def update(self, actor: str) -> InUse:
        """Take the newest shipped version: ``Conflict`` when it is not newer than the one
        in use. Answers what the log holds (another admin's same update included)."""
        return await self._adopt(actor, first_start=False)

    async def in_use(self) -> InUse:
        state = await self.state()
        return state if state.version else await self.adopt_at_first_start()

    async def for_new_job(self) -> tuple[CatalogueVersion, DeviceCatalogue | None]:
        """The version a job created now records, and its content when this process ships
        it (``None``: it does not, so no device name can be checked here)."""
        state = await self.in_use()
        ref = state.ref
        assert ref is not None  # adopted above
        return ref, self.shipped.exactly(ref)

    def available(self, state: InUse) -> DeviceCatalogue | None:
        """The newest shipped version when it is newer than the one in use."""
        newest = self.shipped.newest()
        return newest if newest is not None and newest.version > state.version else None

    def content(self, state: InUse) -> DeviceCatalogue:
        """The in-use version as this process ships it; ``Conflict`` when it does not."""
        found = None if state.ref is None else self.shipped.exactly(state.ref)
        if found is None:
            raise Conflict(
                "device_catalogue",
                f"version {state.version} is in use and this server does not ship it"
                f" (it ships {self.shipped.describe()}): upgrade this server's package",
            )
        return found

    async def _adopt(self, actor: str, *, first_start: bool) -> InUse:
        async def attempt() -> InUse:
            state = await self.state()
            offered = self.shipped.newest()
            if offered is None:
                if first_start and state.version:
                    return state
                raise Conflict(
                    "device_catalogue",
                    f"this server ships no device catalogue ({self.shipped.describe()})",
                )
            cmd = AdoptCatalogue(offered.version, offered.sha256, offered.source, first_start)
            events = decide(state, cmd, Meta(id=new_id(), at=self.clock(), actor=actor))
            for event in events:
                await self.bus.append(
                    event,
                    msg_id=subjects.device_catalogue_msg_id(event.version),
                    expect=Expect(subjects.DEVICE_CATALOGUE, state.seq),
                )
            return await self.state() if events else state

        return await retry_on_conflict(attempt)
