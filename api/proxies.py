"""The proxy pool: register, list, read, retire.

A registration's URL may carry credentials (``http://user:pass@host:port``): they go to
the proxy secrets bucket, never into the log, an answer or an error message.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.authz import access, actor_of
from api.deps import services_from_state
from api.inputs import command_id
from api.licences import check_feature
from api.openapi import problems
from api.pages import PAGE_HEADERS, Cursor, Limit, decode_cursor, page
from api.reads import MIN_SEQ_HELP, wait_for_seq
from api.services import Services
from engine.bus import Bus
from engine.errors import NotFound, Rejected
from engine.proxies.secrets import ProxySecrets
from engine.proxies.service import ProxyCommands, checked_proxy_id
from projections import proxies as proxy_views
from projections.proxies import ProxyView
from schemas.proxies import MAX_BYPASS, ProxyDns
from schemas.proxy_state import ProxyStatus
from schemas.values import JobSettings, ProxyLabel

ProxyIdPath = Annotated[
    str,
    PathParameter(
        description="a proxy id, as registration answered it",
        schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
    ),
]


class RegisterProxyIn(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    label: ProxyLabel | None = None
    # hosts flows reach directly, never through this proxy (``*.example.com``: subdomains)
    bypass: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=253)]], msgspec.Meta(max_length=MAX_BYPASS)
    ] = []
    dns: ProxyDns = "local"  # "proxy": the proxy is handed names, not addresses

    def __repr__(self) -> str:
        # the URL may hold credentials: a traceback that shows locals must not show them
        return f"RegisterProxyIn(url=<hidden>, label={self.label!r})"


class RetireProxyIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class ProxyRegisteredOut(msgspec.Struct, omit_defaults=True):
    proxy_id: str
    scheme: str
    host: str
    port: int
    has_credentials: bool
    seq: int
    label: str | None = None
    bypass: list[str] = []
    dns: str = "local"


class ProxyRetiredOut(msgspec.Struct):
    proxy_id: str
    status: str
    seq: int


def proxies_from_state(state: State) -> ProxyCommands:
    commands: ProxyCommands = state.proxies
    return commands


async def check_pool(bus: Bus, settings: JobSettings) -> None:
    """A job may name only proxies that are registered and not retired (by id); a label
    no proxy carries yet is allowed: the job's flows wait for one."""
    pool = settings.proxies
    if pool is None:
        return
    commands = ProxyCommands(bus, ProxySecrets(bus))  # reads the log only
    for n, proxy_id in enumerate(pool.ids):
        proxy = await commands.load(proxy_id)
        if proxy.status in (ProxyStatus.NONE, ProxyStatus.RETIRED):
            state = "retired" if proxy.status == ProxyStatus.RETIRED else "not registered"
            raise Rejected(f"settings.proxies.ids[{n}]", f"proxy {proxy_id} is {state}")


class ProxyController(Controller):
    path = "/api/v1/proxies"
    opt = access("viewer")
    tags = ["proxies"]
    dependencies = {
        "services": Provide(services_from_state, sync_to_thread=False),
        "commands": Provide(proxies_from_state, sync_to_thread=False),
        "command_id": Provide(command_id, sync_to_thread=False),
    }

    @post(
        "/",
        status_code=201,
        summary="Register an upstream proxy (http, https or socks5, with or without credentials)",
        description="The credentials go to the proxy secrets bucket; the event log records"
        " only where the proxy is, whether it has credentials, and its bypass list and DNS"
        " setting (`local`: the runner resolves names and hands the proxy the address it"
        " checked; `proxy`: the proxy is handed the name).",
        responses=problems(400, 403, 409, 503),
        opt=access("operator"),
    )
    async def register(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[RegisterProxyIn],
        services: NamedDependency[Services],
        commands: NamedDependency[ProxyCommands],
        command_id: NamedDependency[str],
    ) -> ProxyRegisteredOut:
        await check_feature(services, request, "proxy_import", "url")
        event, appended = await commands.register(
            data.url, data.label, actor_of(request), command_id, bypass=data.bypass, dns=data.dns
        )
        return ProxyRegisteredOut(
            proxy_id=event.proxy_id,
            scheme=event.scheme,
            host=event.host,
            port=event.port,
            has_credentials=event.has_credentials,
            seq=appended.seq,
            label=event.label,
            bypass=event.bypass,
            dns=event.dns,
        )

    @get(
        "/",
        summary="The proxy pool with each proxy's health, a page at a time",
        responses=problems(400, 409),
        response_headers=PAGE_HEADERS,
    )
    async def list_proxies(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: Limit = 100,
        cursor: Cursor = None,
        status: Annotated[
            ProxyStatus | None,
            QueryParameter(description="only proxies in this status (retired ones only so)"),
        ] = None,
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> Response[list[ProxyView]]:
        (after,) = decode_cursor(cursor, str) if cursor is not None else (None,)
        await wait_for_seq(services, min_seq)
        proxies = await proxy_views.list_proxies(services.db, status, limit=limit + 1, after=after)
        return page(request, proxies, limit, lambda proxy: (proxy.proxy_id,))

    @get("/{proxy_id:str}", summary="One proxy and its health", responses=problems(400, 404, 409))
    async def get_proxy(
        self,
        proxy_id: ProxyIdPath,
        services: NamedDependency[Services],
        min_seq: Annotated[int, QueryParameter(ge=0, description=MIN_SEQ_HELP)] = 0,
    ) -> ProxyView:
        await wait_for_seq(services, min_seq)
        proxy = await proxy_views.get_proxy(services.db, checked_proxy_id(proxy_id))
        if proxy is None:
            raise NotFound("proxy_id", f"no proxy {proxy_id}")
        return proxy

    @post(
        "/{proxy_id:str}/retire",
        status_code=202,
        summary="Retire: never handed out again; its credentials are purged",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def retire(
        self,
        request: Request[Any, Any, Any],
        proxy_id: ProxyIdPath,
        commands: NamedDependency[ProxyCommands],
        command_id: NamedDependency[str],
        data: JSONBody[RetireProxyIn | None] = None,
    ) -> ProxyRetiredOut:
        appended = await commands.retire(
            proxy_id, data.reason if data else "", actor_of(request), command_id
        )
        return ProxyRetiredOut(proxy_id=proxy_id, status="retired", seq=appended.seq)

    @delete(
        "/{proxy_id:str}",
        status_code=202,
        summary="Retire (as POST …/retire)",
        responses=problems(400, 404, 409, 503),
        opt=access("operator"),
    )
    async def delete_proxy(
        self,
        request: Request[Any, Any, Any],
        proxy_id: ProxyIdPath,
        commands: NamedDependency[ProxyCommands],
        command_id: NamedDependency[str],
    ) -> ProxyRetiredOut:
        appended = await commands.retire(proxy_id, "deleted by api", actor_of(request), command_id)
        return ProxyRetiredOut(proxy_id=proxy_id, status="retired", seq=appended.seq)
