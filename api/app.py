"""``create_app``: open the bus, the projector and the read model in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.openapi import OpenAPIConfig

from api.audit import AuditController
from api.auth import AuthController
from api.authz import access
from api.body import refuse_deep_json
from api.consents import ConsentController
from api.crawler import CrawlerJobs
from api.dashboard import dashboard
from api.dataset_uploads import dataset_routes, uploads_lifespan
from api.devices import DeviceController
from api.errors import EXCEPTION_HANDLERS
from api.flows import FlowController
from api.health import healthz, readyz
from api.hygiene import HttpHygiene
from api.identity import document_refusals, identity_lifespan, require_access
from api.jobs import JobController
from api.licences import LicenceController
from api.live import live, live_hub
from api.live_sse import job_events
from api.log_feed import job_logs_lifespan
from api.log_ingest import LegacyLogIngest, LogIngest
from api.log_reads import JobLogReads, LegacyLogStream
from api.metrics import MetricsController
from api.openapi import StrictStructSchemaPlugin
from api.proxies import ProxyController
from api.quarantine import QuarantineController
from api.read_side import ReadSide
from api.runner_keys import RunnerKeyController
from api.runners import RunnerController
from api.services import ApiConfig, Services
from api.users import ApiKeysController, UsersController
from engine.bus import Bus
from engine.consent import ConsentCommands
from engine.devices import DeviceCatalogues
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
            jobs=JobCommands(bus, shipped=config.device_catalogues),
            consents=ConsentCommands(bus, policy=config.consent),
            devices=DeviceCatalogues(bus, config.device_catalogues),
        )
        await app.state.services.devices.adopt_at_first_start()
        app.state.proxies = ProxyCommands(bus, ProxySecrets(bus))
        try:
            yield
        finally:
            await db.close()
            await projector.stop()
            await bus.close()

    app = Litestar(
        route_handlers=[
            healthz,
            readyz,
            dashboard,
            live,
            job_events,
            JobController,
            FlowController,
            DeviceController,
            ConsentController,
            RunnerController,
            RunnerKeyController,
            QuarantineController,
            ProxyController,
            MetricsController,
            *(LogIngest, LegacyLogIngest, CrawlerJobs, JobLogReads, LegacyLogStream),
            AuditController,
            *(AuthController, UsersController, ApiKeysController),
            LicenceController,
            *dataset_routes(config.uploads),
        ],
        guards=[require_access],
        lifespan=[lifespan, identity_lifespan, live_hub, job_logs_lifespan, uploads_lifespan],
        before_request=refuse_deep_json,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        logging_config=None,  # the process's logging renders and redacts (cli/logs.py)
        openapi_config=OpenAPIConfig(
            title="TrafficBuster",
            version=VERSION,
            # the API's description is no secret: anyone may read it
            openapi_router=Router(
                path="/schema", route_handlers=[], opt=access("public"), include_in_schema=False
            ),
        ),
        request_max_body_size=config.body_limit,
        plugins=[StrictStructSchemaPlugin(), ReadSide(), HttpHygiene(config.http)],
    )
    document_refusals(app)
    return app
