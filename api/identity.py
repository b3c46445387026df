"""Who is calling: sessions and API keys resolved to a ``Principal``, and the one guard
every route passes through, which compares the caller with the route's access level.

The identity services open in the app's lifespan: the sessions and API keys buckets
followed by watches, the session cleaner, and the first admin when no user exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import aiosqlite
import structlog
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from api.authz import ACCESS_OPT, PRINCIPAL_SCOPE_KEY, RANKS, Principal
from api.dto import Problem
from api.openapi import MEANING
from api.origins import ANY, same_origin
from api.services import IdentityConfig, Services
from engine.bus import Bus
from engine.cancellation import stop_task
from engine.errors import Conflict
from engine.identity.api_keys import ApiKey, ApiKeys, looks_like_key, may_ingest, role_of_key
from engine.identity.buckets import API_KEYS_BUCKET, SESSIONS_BUCKET, bucket
from engine.identity.passwords import warm_up
from engine.identity.service import UserCommands
from engine.identity.sessions import Session, Sessions
from engine.identity.throttle import Policy, Throttle
from engine.identity.users import User
from projections import queries
from projections import users as users_read
from schemas.events import Role, SessionExpired, UserLoggedOut
from schemas.ids import new_id, utcnow

log = structlog.get_logger("tb.identity")

SESSION_COOKIE = "tb_session"
API_KEY_HEADER = "x-api-key"
FIRST_ADMIN = "admin"
NO_ADMIN_PASSWORD = (
    "no user exists yet and TB_ADMIN_PASSWORD is not set: set TB_ADMIN_PASSWORD to the"
    " password the first user, admin, gets (or start with `tb up`, which makes one)"
)
INGEST_BY_SESSION = "ingest_by_session"  # opt: an operator's session opens this ingest route
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE_FROM_ELSEWHERE = (
    "the session cookie changes nothing for a page of another origin: this request's"
    " Origin is missing or not the dashboard's nor a listed one (send the token as"
    " Authorization: Bearer, or an API key)"
)
NEEDS_CREDENTIALS = "a session token (Authorization: Bearer) or an API key is required"


async def plan_of_user(db: aiosqlite.Connection, user_id: str) -> str:
    """The name of the user's licence plan (from their ``LicenseAssigned`` events)."""
    return await queries.plan_of(db, user_id)


@dataclass
class Identity:
    bus: Bus
    db: aiosqlite.Connection
    config: IdentityConfig
    users: UserCommands
    sessions: Sessions
    keys: ApiKeys
    clock: Callable[[], float] = time.time
    user_throttle: Throttle = field(default_factory=lambda: Throttle(Policy(free=4)))
    address_throttle: Throttle = field(default_factory=lambda: Throttle(Policy(free=20)))
    _ended: dict[str, asyncio.Event] = field(default_factory=dict)  # by session id
    _ending: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sessions.on_end(self._session_ended)
        self.sessions.on_start(self._session_started)

    def _session_started(self, key: str, session: Session) -> None:
        """One interactive session per user, across replicas: two logins at once on two
        replicas each miss the other's new session, so every replica that hears of a
        session ends the user's older interactive ones (the same on every replica)."""
        if session.kind != "interactive":
            return
        for other_key, other in self.sessions.of_user(session.user_id):
            older = (other.created, other.session_id) < (session.created, session.session_id)
            if other.kind == "interactive" and older:
                task = asyncio.create_task(
                    self.end_session(other_key, other, "new login", session.user_id)
                )
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)

    def _session_ended(self, session: Session) -> None:
        if (ended := self._ended.pop(session.session_id, None)) is not None:
            ended.set()

    def session_ended(self, session_id: str) -> asyncio.Event:
        """Set when the session ends (on whichever replica ended it)."""
        return self._ended.setdefault(session_id, asyncio.Event())

    async def user(self, user_id: str) -> User | None:
        """The user as the read model has them, or from the log when the read model has
        not caught up yet (a user made a moment ago)."""
        row = await users_read.user(self.db, user_id)
        if row is not None:
            return User(
                user_id=row.user_id,
                username=row.username,
                role=cast(Role, row.role),
                disabled=row.disabled,
                version=1,
            )
        found = await self.users.load(user_id)
        return found if found.exists else None

    async def session_principal(self, token: str) -> Principal | None:
        session = await self.sessions.find(token, self.clock())
        if session is None:
            return None
        user = await self.user(session.user_id)
        if user is None or user.disabled:
            return None
        return Principal(
            user_id=user.user_id,
            username=user.username,
            role=user.role,
            plan=await plan_of_user(self.db, user.user_id),
            via="session",
            session_id=session.session_id,
        )

    async def key_principal(self, key: str) -> tuple[Principal | None, ApiKey | None]:
        """The principal a key acts as (``None`` for a logs-only key), and the key."""
        record = await self.keys.find(key)
        if record is None:
            return None, None
        user = await self.user(record.user_id)
        if user is None or user.disabled:
            return None, None
        role = role_of_key(user.role, record.scopes)
        if role is None:
            return None, record
        principal = Principal(
            user_id=user.user_id,
            username=user.username,
            role=role,
            plan=await plan_of_user(self.db, user.user_id),
            via="api_key",
            key_id=record.key_id,
            scopes=frozenset(record.scopes),
        )
        return principal, record

    async def ingest_key(self, key: str) -> Principal | None:
        """A user API key allowed to post logs (an operator's or an admin's), as the
        principal it acts for."""
        record = await self.keys.find(key)
        if record is None or not may_ingest(record.scopes):
            return None
        user = await self.user(record.user_id)
        if user is None or user.disabled or RANKS[user.role] < RANKS["operator"]:
            return None  # posting logs moves and ends jobs: a viewer's key may not
        return Principal(
            user_id=user.user_id,
            username=user.username,
            role="viewer",
            plan=await plan_of_user(self.db, user.user_id),
            via="api_key",
            key_id=record.key_id,
            scopes=frozenset(record.scopes),
        )

    async def end_sessions(
        self, user_id: str, reason: str, actor: str, *, interactive_only: bool = True
    ) -> None:
        for key, session in self.sessions.of_user(user_id):
            if interactive_only and session.kind != "interactive":
                continue
            await self.end_session(key, session, reason, actor)

    async def end_session(self, key: str, session: Session, reason: str, actor: str) -> None:
        await self.sessions.end(key)
        event = UserLoggedOut(
            id=new_id(),
            at=utcnow(),
            actor=actor,
            user_id=session.user_id,
            session_id=session.session_id,
            reason=reason,
        )
        await self.bus.append(event, msg_id=f"session-ended:{session.session_id}")

    async def clean(self) -> int:
        """End the sessions past their expiry; every replica may run this at once (the
        delete is idempotent and the event's msg-id is the session's)."""
        ended = 0
        for key, session, reason in self.sessions.expired(self.clock()):
            await self.sessions.end(key)
            event = SessionExpired(
                id=new_id(),
                at=utcnow(),
                actor="system",
                user_id=session.user_id,
                session_id=session.session_id,
                reason=reason,
            )
            await self.bus.append(event, msg_id=f"session-ended:{session.session_id}")
            ended += 1
        return ended


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    scheme, _, value = (connection.headers.get("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def cookie_from_elsewhere(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """A request that changes something and rides the session cookie, from a page that
    is neither the dashboard nor a listed origin. SameSite=Strict keeps the cookie from
    other sites only: a page on another port of the same host, or on a sibling
    subdomain, is the same site, and its form post (text/plain, no CORS preflight)
    carries the cookie. Browsers send ``Origin`` with every such request."""
    if connection.scope["type"] != ScopeType.HTTP or connection.scope["method"] in SAFE_METHODS:
        return False
    if _bearer(connection) is not None:
        return False  # the token came in the header, which no other page can set
    origin = connection.headers.get("origin")
    return origin is None or not admitted_origin(connection, origin)


def admitted_origin(connection: ASGIConnection[Any, Any, Any, Any], origin: str) -> bool:
    """The page that sent the request is the dashboard or of a listed origin."""
    services: Services = connection.app.state.services
    allowed = set(services.config.http.allowed_origins)
    return bool({ANY, origin} & allowed) or same_origin(origin, connection.scope)


def sent_by_a_browser(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """A browser sent it: it names the page's ``Origin`` or says ``Sec-Fetch-*`` how it
    fetched. Workers and scripts send neither; a page of any origin, even one whose
    name was rebound to this machine's address, cannot leave them out."""
    return any(name == "origin" or name.startswith("sec-fetch-") for name in connection.headers)


def credentials_of(connection: ASGIConnection[Any, Any, Any, Any]) -> tuple[str | None, str | None]:
    """(session token, API key) the request carries, either possibly ``None``."""
    token = key = None
    if (value := _bearer(connection)) is not None:
        if looks_like_key(value):
            key = value
        else:
            token = value
    if header := connection.headers.get(API_KEY_HEADER):
        key = key or header.strip()
    if token is None and (cookie := connection.cookies.get(SESSION_COOKIE)):
        token = cookie
    return token, key


def identity_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity:
    identity: Identity = connection.app.state.identity
    return identity


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    identity = identity_of(connection)
    token, key = credentials_of(connection)
    if token is not None and (principal := await identity.session_principal(token)):
        if not cookie_from_elsewhere(connection):
            return principal
        if key is None:
            raise PermissionDeniedException(COOKIE_FROM_ELSEWHERE)
    if key is not None:
        principal, record = await identity.key_principal(key)
        if principal is None and record is not None:
            raise PermissionDeniedException("this API key is for log ingest only")
        return principal
    return None


async def ingest_principal(
    connection: ASGIConnection[Any, Any, Any, Any], by_session: bool
) -> Principal | None:
    """Who may use the crawler-compatible routes (open, cancel and log external jobs):
    a user of at least the operator role, by an API key that may post logs, or by a
    session where the route takes one (``by_session``; log ingest ignores sessions);
    ``None`` leaves the route's own guard to decide (the ingest key, or loopback)."""
    identity = identity_of(connection)
    token, key = credentials_of(connection)
    if key is not None:
        return await identity.ingest_key(key)
    if by_session and token is not None and not cookie_from_elsewhere(connection):
        principal = await identity.session_principal(token)
        if principal is not None and principal.at_least("operator"):
            return principal
    return None


async def require_access(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """The guard of every route: 401 without valid credentials, 403 with too low a role,
    and 403 on a route that declares no access level at all."""
    level = handler.opt.get(ACCESS_OPT)
    if level is None and set(getattr(handler, "http_methods", ())) == {"OPTIONS"}:
        return  # the methods a path allows are no secret
    if level is None:
        raise PermissionDeniedException("this route declares no access level")
    if level in ("public", "runner_key"):
        return
    if level == "ingest":  # the route's own key guard refuses whoever is not let in here
        by_session = bool(handler.opt.get(INGEST_BY_SESSION))
        if (principal := await ingest_principal(connection, by_session)) is not None:
            connection.scope[PRINCIPAL_SCOPE_KEY] = principal  # type: ignore[literal-required]
        return
    principal = await authenticate(connection)
    if principal is None:
        if connection.scope["type"] == ScopeType.WEBSOCKET and credentials_of(connection) == (
            None,
            None,
        ):
            return  # the socket authenticates with its first message
        raise NotAuthorizedException(NEEDS_CREDENTIALS, headers={"WWW-Authenticate": "Bearer"})
    if RANKS[principal.role] < RANKS[cast(Role, level)]:
        raise PermissionDeniedException(f"needs the {level} role (you are {principal.role})")
    connection.scope[PRINCIPAL_SCOPE_KEY] = principal  # type: ignore[literal-required]


def document_refusals(app: Litestar) -> None:
    """Every route that needs a caller says in its OpenAPI that it can answer 401 and 403,
    and every route that takes a body that it can answer 413."""
    spec = {c: ResponseSpec(data_container=Problem, description=MEANING[c]) for c in MEANING}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            codes = []
            if handler.opt.get(ACCESS_OPT) not in (None, "public"):
                codes += [401, 403]
            if handler.http_methods & {"POST", "PUT", "PATCH"}:
                codes.append(413)
            handler.responses = {**{c: spec[c] for c in codes}, **(handler.responses or {})}


async def first_admin(identity: Identity) -> None:
    """With no user at all, create ``admin`` with ``TB_ADMIN_PASSWORD``; without that
    password the API cannot start (nobody could log in)."""
    if await identity.users.any_user():
        return
    password = identity.config.admin_password
    if not password:
        raise RuntimeError(NO_ADMIN_PASSWORD)
    with contextlib.suppress(Conflict):  # another replica made it first
        await identity.users.create(FIRST_ADMIN, password, "admin", actor="system")
        log.info("identity.first_admin", username=FIRST_ADMIN)


async def _clean_every(identity: Identity, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await identity.clean()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the cleaner must outlive a NATS hiccup
            log.warning("identity.clean_failed", error=str(err))


@asynccontextmanager
async def identity_lifespan(app: Litestar) -> AsyncIterator[None]:
    services: Services = app.state.services
    config = services.config.identity
    sessions = Sessions(await bucket(services.bus, SESSIONS_BUCKET), config.sessions)
    keys = ApiKeys(await bucket(services.bus, API_KEYS_BUCKET))
    await sessions.start()
    await keys.start()
    identity = Identity(
        bus=services.bus,
        db=services.db,
        config=config,
        users=UserCommands(services.bus),
        sessions=sessions,
        keys=keys,
    )
    app.state.identity = identity
    cleaner = asyncio.create_task(_clean_every(identity, config.clean_every))
    try:
        await first_admin(identity)
        await warm_up()
        yield
    finally:
        await stop_task(cleaner)
        await keys.stop()
        await sessions.stop()
