"""``create_app``: open the bus, the projector and the read model in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from api.audit import AuditController
from api.body import refuse_deep_json
from api.consents import ConsentController
from api.dashboard import dashboard
from api.devices import list_devices
from api.errors import EXCEPTION_HANDLERS
from api.flows import FlowController
from api.health import healthz, readyz
from api.jobs import JobController
from api.live import live
from api.openapi import StrictStructSchemaPlugin
from api.proxies import ProxyController
from api.quarantine import QuarantineController
from api.runners import RunnerController
from api.services import ApiConfig, Services
from engine.bus import Bus
from engine.consent import ConsentCommands
from engine.jobs.service import JobCommands
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands
from projections import db as read_db
from projections.projector import Projector
from schemas import VERSION


def create_app(config: ApiConfig) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        bus = await Bus.connect(config.nats_url, name="tb-api", config=config.bus)
        await bus.provision()
        projector = Projector(bus, config.db_path)
        await projector.start()
        db = await read_db.connect(config.db_path, readonly=True)
        app.state.services = Services(
            config=config,
            bus=bus,
            projector=projector,
            db=db,
            jobs=JobCommands(bus),
            consents=ConsentCommands(bus),
        )
        app.state.proxies = ProxyCommands(bus, ProxySecrets(bus))
        try:
            yield
        finally:
            await db.close()
            await projector.stop()
            await bus.close()

    return Litestar(
        route_handlers=[
            healthz,
            readyz,
            dashboard,
            live,
            JobController,
            FlowController,
            list_devices,
            ConsentController,
            RunnerController,
            QuarantineController,
            ProxyController,
            AuditController,
        ],
        lifespan=[lifespan],
        before_request=refuse_deep_json,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(title="TrafficBuster", version=VERSION, path="/schema"),
        request_max_body_size=config.body_limit,
        plugins=[StrictStructSchemaPlugin()],
    )
