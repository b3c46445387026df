"""Device profiles a job may name, and the device catalogue: which version is in use
(a fact of the log, the same for every replica), which newer one this server ships, and
taking it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from api.authz import access, actor_of
from api.deps import services_from_state
from api.openapi import problems
from api.services import Services
from engine.devices.decider import InUse
from engine.errors import NotFound
from schemas.device_catalogue import DeviceCatalogue
from schemas.devices import Device, DeviceProfile, resolve

UPDATE_AVAILABLE = "update platform data available"


class CatalogueOut(msgspec.Struct, kw_only=True):
    version: int
    source: str
    sha256: str
    # descriptors it holds (``default`` aside); None: a version in use that this server
    # does not ship (an older package than the one that took it)
    devices: int | None


class InUseOut(CatalogueOut, kw_only=True):
    adopted_at: datetime | None
    adopted_by: str
    seq: int  # its adoption's stream sequence


class CatalogueStatus(msgspec.Struct, kw_only=True):
    """``available``: the newest version this server ships, when newer than the one in
    use (``message`` then says so); ``None`` otherwise."""

    in_use: InUseOut
    available: CatalogueOut | None
    message: str | None


def _described(catalogue: DeviceCatalogue) -> CatalogueOut:
    return CatalogueOut(
        version=catalogue.version,
        source=catalogue.source,
        sha256=catalogue.sha256,
        devices=len(catalogue.devices),
    )


def _status(services: Services, state: InUse) -> CatalogueStatus:
    shipped = None if state.ref is None else services.devices.shipped.exactly(state.ref)
    available = services.devices.available(state)
    return CatalogueStatus(
        in_use=InUseOut(
            version=state.version,
            source=state.source,
            sha256=state.sha256,
            devices=len(shipped.devices) if shipped is not None else None,
            adopted_at=state.adopted_at,
            adopted_by=state.adopted_by,
            seq=state.seq,
        ),
        available=_described(available) if available is not None else None,
        message=UPDATE_AVAILABLE if available is not None else None,
    )


class DeviceController(Controller):
    path = "/api/v1/devices"
    opt = access("viewer")
    tags = ["devices"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get(
        "/",
        summary="Device profiles a job's settings.devices may name, with what each presents",
        description="The catalogue version in use, or with ?version= another this server"
        " ships. `default` is the runner's browser as launched (its own User-Agent,"
        " 1280x800).",
        responses=problems(400, 404, 409, 503),
    )
    async def list_devices(
        self,
        services: NamedDependency[Services],
        version: Annotated[
            int | None,
            QueryParameter(ge=1, le=1_000_000, description="a shipped version (default: in use)"),
        ] = None,
    ) -> list[Device]:
        if version is None:
            catalogue = services.devices.content(await services.devices.in_use())
        else:
            found = services.devices.shipped.get(version)
            if found is None:
                shipped = services.devices.shipped.describe()
                raise NotFound("version", f"this server ships no version {version} ({shipped})")
            catalogue = found
        return [resolve(DeviceProfile(name=name), catalogue.devices) for name in catalogue.names()]

    @get(
        "/catalogue",
        summary="The device catalogue version in use, and a newer one this server ships",
        responses=problems(503),
    )
    async def catalogue(self, services: NamedDependency[Services]) -> CatalogueStatus:
        return _status(services, await services.devices.in_use())

    @post(
        "/catalogue/update",
        status_code=200,
        summary="Take the newest device catalogue version this server ships",
        description="Jobs created from now on use it; a job keeps the version it was"
        " created with. 409 when nothing newer is shipped.",
        responses=problems(403, 409, 503),
        opt=access("admin"),
    )
    async def update(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> CatalogueStatus:
        return _status(services, await services.devices.update(actor_of(request)))
