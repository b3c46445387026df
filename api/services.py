"""What the handlers need, opened once in the lifespan and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite

from api.hygiene import JSON_BODY_LIMIT, HttpPolicy
from engine.bus import Bus, BusConfig
from engine.consent import ConsentCommands
from engine.consent.service import ConsentPolicy
from engine.datasets.uploads import UploadsConfig
from engine.devices import DeviceCatalogues
from engine.identity.sessions import SessionPolicy
from engine.jobs.service import JobCommands
from projections.projector import Projector
from schemas.device_catalogue import ShippedCatalogues


@dataclass(frozen=True)
class LogsConfig:
    """Job logs: ``ingest_api_key`` (TB_INGEST_API_KEY) is the X-API-Key log ingest
    requires (none: ingest is open to loopback clients only); ``keepalive``: seconds
    between SSE keepalive comments; ``save_after``: seconds after a job ends before its
    log is saved (lines still on their way get there first)."""

    ingest_api_key: str | None = None
    keepalive: float = 15.0
    save_after: float = 2.0


@dataclass(frozen=True)
class IdentityConfig:
    """``admin_password`` (TB_ADMIN_PASSWORD): the password of the first user, ``admin``,
    made when no user exists; ``sessions``: lifetimes; ``clean_every``: seconds between
    sweeps for expired sessions."""

    admin_password: str | None = None
    sessions: SessionPolicy = field(default_factory=SessionPolicy)
    clean_every: float = 1.0


@dataclass(frozen=True)
class ApiConfig:
    nats_url: str
    db_path: Path
    bus: BusConfig = BusConfig()
    body_limit: int = JSON_BODY_LIMIT  # bytes of a JSON request body (TB_BODY_LIMIT)
    read_wait_timeout: float = 5.0
    live_queue: int = 256  # live updates (one read's messages) a client may leave unread
    live_keepalive: float = 15.0  # seconds of quiet before an SSE stream sends a comment
    logs: LogsConfig = LogsConfig()
    http: HttpPolicy = field(default_factory=HttpPolicy)  # CORS origins, HSTS
    identity: IdentityConfig = IdentityConfig()
    consent: ConsentPolicy = field(default_factory=ConsentPolicy)
    uploads: UploadsConfig = field(default_factory=UploadsConfig)
    # the device catalogue versions this server ships (TB_DEVICE_CATALOGUES)
    device_catalogues: ShippedCatalogues = field(default_factory=ShippedCatalogues)


@dataclass
class Services:
    config: ApiConfig
    bus: Bus
    projector: Projector
    db: aiosqlite.Connection  # read-only connection for queries
    jobs: JobCommands
    consents: ConsentCommands
    devices: DeviceCatalogues
