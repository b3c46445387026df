"""Runner keys (admin) and the runner's credential exchange (the key itself).

An admin makes a key for each runner; the key is shown once and stored only as digests
(``engine.runner_keys``). A runner trades its key, and the platform it serves, for NATS
credentials whose permissions allow a runner's work and nothing else. A key opens no
other route: the exchange is its only door, and a user's token is no NATS credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from datetime import datetime
from typing import Annotated, Any

import msgspec
import nats
import nats.errors
import structlog
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, PathParameter

from api.authz import access, actor_of
from api.deps import services_from_state
from api.dto import Problem
from api.inputs import command_id
from api.openapi import problems
from api.services import Services
from engine.bus import without_credentials
from engine.errors import Invalid, NotFound, Rejected
from engine.runner_keys import RunnerKeys, issue, matches, password_for, split_key
from schemas.events import RunnerKeyCreated, RunnerKeyRevoked
from schemas.ids import ID_PATTERN, new_id, utcnow
from schemas.subjects import command_msg_id
from schemas.values import Platform

log = structlog.get_logger("tb.api")

RUNNER_KEY_HEADER = "X-Runner-Key"
RUNNER_NATS_URL_ENV = "TB_RUNNER_NATS_URL"  # where runners reach NATS, if not where the API does
INVALID_KEY = "Invalid runner key"
_ID = re.compile(ID_PATTERN)
USABLE_WITHIN = 5.0  # seconds the exchange waits for nats-server to know the credentials

FORBIDDEN = {403: ResponseSpec(data_container=Problem, description="missing, wrong or revoked key")}

KeyIdPath = Annotated[
    str,
    PathParameter(
        description="a runner key's id, as creation answered it",
        schema_extra={"pattern": ID_PATTERN.removesuffix("(?!\\n)"), "maxLength": 128},
    ),
]


class Forbidden(Rejected):
    status_code = 403


class Unavailable(Rejected):
    status_code = 503


class CreateRunnerKeyIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class RunnerKeyCreatedOut(msgspec.Struct):
    key_id: str
    key: str  # shown this once: only digests of it are kept
    name: str
    runner_id: str
    seq: int


class RunnerKeyOut(msgspec.Struct, omit_defaults=True):
    key_id: str
    name: str
    runner_id: str
    created_at: datetime
    created_by: str
    os: str | None = None  # the platform its runner declared at its last exchange
    browser: str | None = None


class RunnerKeyRevokedOut(msgspec.Struct):
    key_id: str
    status: str
    seq: int


class RunnerCredentialsOut(msgspec.Struct):
    """What a runner connects to NATS with; its permissions allow a runner's work only."""

    runner_id: str
    nats_url: str
    user: str
    password: str
    os: str
    browser: str

    def __repr__(self) -> str:
        return f"RunnerCredentialsOut(runner_id={self.runner_id!r}, password=<hidden>)"


def runner_nats_url(services: Services) -> str:
    return os.environ.get(RUNNER_NATS_URL_ENV) or without_credentials(services.config.nats_url)


async def _usable(url: str, user: str, password: str, within: float) -> bool:
    """Whether nats-server accepts the credentials, waiting ``within`` seconds for the
    configuration's owner to add the user and reload."""
    deadline = time.monotonic() + within
    while True:
        try:
            nc = await nats.connect(
                url,
                user=user,
                password=password,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                connect_timeout=2,
                error_cb=_quiet,
            )
        except (nats.errors.Error, OSError, TimeoutError):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
            continue
        with contextlib.suppress(Exception):
            await nc.close()
        return True


async def _quiet(err: Exception) -> None:
    """A refused attempt is expected while the user is being added."""


class RunnerKeyController(Controller):
    path = "/api/v1/runners"
    tags = ["runners"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/keys",
        status_code=201,
        summary="Make a runner key (shown once; kept as digests only)",
        responses=problems(400, 503),
        opt=access("admin"),
    )
    async def create_key(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CreateRunnerKeyIn],
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> RunnerKeyCreatedOut:
        actor = actor_of(request)
        issued = issue(data.name, actor)
        await RunnerKeys(services.bus).add(issued.record)
        record = issued.record
        event = RunnerKeyCreated(
            id=new_id(),
            at=utcnow(),
            actor=actor,
            key_id=record.key_id,
            name=record.name,
            runner_id=record.runner_id,
        )
        appended = await services.bus.append(event, msg_id=command_msg_id(command_id))
        log.info("runner_key.created", key_id=record.key_id, runner_id=record.runner_id)
        return RunnerKeyCreatedOut(
            key_id=record.key_id,
            key=issued.key,
            name=record.name,
            runner_id=record.runner_id,
            seq=appended.seq,
        )

    @get(
        "/keys",
        summary="The runner keys in use (never the keys themselves)",
        responses=problems(503),
        opt=access("admin"),
    )
    async def list_keys(self, services: NamedDependency[Services]) -> list[RunnerKeyOut]:
        return [
            RunnerKeyOut(
                key_id=r.key_id,
                name=r.name,
                runner_id=r.runner_id,
                created_at=r.created_at,
                created_by=r.created_by,
                os=r.platform.os if r.platform else None,
                browser=r.platform.browser if r.platform else None,
            )
            for r in await RunnerKeys(services.bus).all()
        ]

    @delete(
        "/keys/{key_id:str}",
        status_code=200,
        summary="Revoke a runner key: its NATS user is removed and its runner disconnected",
        responses=problems(400, 404, 503),
        opt=access("admin"),
    )
    async def revoke_key(
        self,
        request: Request[Any, Any, Any],
        key_id: KeyIdPath,
        services: NamedDependency[Services],
        command_id: NamedDependency[str],
    ) -> RunnerKeyRevokedOut:
        if not _ID.fullmatch(key_id):
            raise Invalid("key_id", "must be a runner key id (letters, digits, _ and -)")
        if not await RunnerKeys(services.bus).remove(key_id):
            raise NotFound("key_id", f"no runner key {key_id}")
        event = RunnerKeyRevoked(
            id=new_id(), at=utcnow(), actor=actor_of(request), key_id=key_id, reason="revoked"
        )
        appended = await services.bus.append(event, msg_id=command_msg_id(command_id))
        log.info("runner_key.revoked", key_id=key_id)
        return RunnerKeyRevokedOut(key_id=key_id, status="revoked", seq=appended.seq)

    @post(
        "/credentials",
        status_code=200,
        summary="A runner trades its key (X-Runner-Key) for NATS credentials for its platform",
        description="Answers 403 for a missing, wrong or revoked key; the credentials allow"
        " a runner's work only (see the README's NATS permission table).",
        responses={**problems(400, 503), **FORBIDDEN},
        opt=access("runner_key"),
    )
    async def exchange(
        self,
        data: JSONBody[Platform],
        services: NamedDependency[Services],
        runner_key: Annotated[
            str | None,
            HeaderParameter(
                name=RUNNER_KEY_HEADER,
                required=False,
                description="the runner key, as its creation answered it",
                schema_extra={"maxLength": 200},
            ),
        ] = None,
    ) -> RunnerCredentialsOut:
        parts = split_key(runner_key or "")
        keys = RunnerKeys(services.bus)
        record = await keys.get(parts[0]) if parts and _ID.fullmatch(parts[0]) else None
        if parts is None or not matches(record, parts[1]) or record is None:
            raise Forbidden(RUNNER_KEY_HEADER, INVALID_KEY)
        record = await keys.set_platform(record, data)
        if record is None:  # revoked while we looked
            raise Forbidden(RUNNER_KEY_HEADER, INVALID_KEY)
        await services.bus.ensure_dispatch_consumer(data.os, data.browser)
        url = runner_nats_url(services)
        password = password_for(parts[1])
        if not await _usable(url, record.runner_id, password, USABLE_WITHIN):
            raise Unavailable("nats", "the NATS server did not take the runner's user in time")
        log.info("runner_key.exchanged", key_id=record.key_id, runner_id=record.runner_id)
        return RunnerCredentialsOut(
            runner_id=record.runner_id,
            nats_url=url,
            user=record.runner_id,
            password=password,
            os=data.os,
            browser=data.browser,
        )
