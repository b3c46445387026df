"""Login, logout and who-am-I: ``/api/v1/auth``.

Login answers a bearer token (and sets it as an HttpOnly, SameSite=Strict cookie for
the dashboard). One interactive session per user: a new login ends the older ones.
Wrong passwords slow the next attempts down, per username and per client address.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import (
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
)
from litestar.params import JSONBody

from api.authz import access, principal_of
from api.identity import SESSION_COOKIE, Identity, authenticate, identity_of
from api.openapi import problems
from api.reads import MIN_SEQ_HEADER
from engine.errors import Conflict
from engine.identity.users import User
from schemas.events import LoginFailed, UserLoggedIn
from schemas.ids import new_id, utcnow
from schemas.licences import plan_named

WRONG = "username or password is wrong"


class LoginIn(msgspec.Struct, forbid_unknown_fields=True):
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class LoginOut(msgspec.Struct):
    token: str
    expires_at: float  # epoch seconds
    session_id: str


class Me(msgspec.Struct):
    user_id: str
    username: str
    role: str
    via: str
    plan: str
    licence: dict[str, Any]
    session_id: str | None = None
    key_id: str | None = None


def _client(request: Request[Any, Any, Any]) -> str:
    return (request.client.host if request.client else "")[:100]


async def _failed(
    identity: Identity, username: str, client: str, reason: str, user: User | None = None
) -> None:
    """Record the failure; ``user`` when the name is known (read no more of the log for a
    known name than for an unknown one: the time taken must not tell them apart)."""
    event = LoginFailed(
        id=new_id(),
        at=utcnow(),
        actor="api",
        user_id=user.user_id if user is not None and user.exists else "unknown",
        username=username,
        client=client,
        reason=reason,
    )
    await identity.bus.append(event, msg_id=event.id)


async def login(identity: Identity, data: LoginIn, client: str) -> LoginOut:
    now = identity.clock()
    keys_user, keys_addr = [f"user:{data.username.lower()}"], [f"addr:{client}"]
    if identity.user_throttle.wait(keys_user, now) or identity.address_throttle.wait(
        keys_addr, now
    ):
        wait = max(identity.user_throttle.fail(keys_user, now), 0.0)
        wait = max(wait, identity.address_throttle.fail(keys_addr, now))
        user = await identity.users.by_name(data.username)  # known or not: the same read
        await _failed(identity, data.username, client, "throttled", user)
        seconds = max(1, math.ceil(wait))
        raise TooManyRequestsException(
            f"too many failed logins: retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    user, ok = await identity.users.check_password(data.username, data.password)
    if not ok:
        identity.user_throttle.fail(keys_user, now)
        identity.address_throttle.fail(keys_addr, now)
        reason = "wrong password" if user.exists else "unknown user"
        await _failed(identity, data.username, client, reason, user)
        raise NotAuthorizedException(WRONG)
    if user.disabled:
        await _failed(identity, data.username, client, "disabled", user)
        raise PermissionDeniedException("this user is disabled")
    identity.user_throttle.succeed(keys_user)
    identity.address_throttle.succeed(keys_addr)
    await identity.end_sessions(user.user_id, "new login", actor=user.user_id)
    session_id = new_id()
    token, session = await identity.sessions.create(user.user_id, session_id, "interactive", now)
    event = UserLoggedIn(
        id=new_id(),
        at=utcnow(),
        actor=user.user_id,
        user_id=user.user_id,
        session_id=session_id,
        client=client,
    )
    await identity.bus.append(event, msg_id=event.id)
    return LoginOut(token=token, expires_at=session.expires_at, session_id=session_id)


class AuthController(Controller):
    path = "/api/v1/auth"
    tags = ["auth"]

    @post(
        "/login",
        status_code=200,
        summary="Log in: a bearer token for this user (older interactive sessions end)",
        responses=problems(400, 401, 403, 429, 503),
        opt=access("public"),
    )
    async def login(
        self, request: Request[Any, Any, Any], data: JSONBody[LoginIn]
    ) -> Response[LoginOut]:
        identity = identity_of(request)
        out = await login(identity, data, _client(request))
        cookie = Cookie(
            key=SESSION_COOKIE,
            value=out.token,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
            max_age=int(identity.config.sessions.max_age),
        )
        return Response(out, cookies=[cookie])

    @post(
        "/logout",
        status_code=204,
        summary="End this session (its token answers 401 from now on)",
        responses=problems(401, 409, 503),
        opt=access("viewer"),
    )
    async def logout(self, request: Request[Any, Any, Any]) -> Response[None]:
        principal = principal_of(request)
        identity = identity_of(request)
        if principal is None or principal.session_id is None:
            raise Conflict("Authorization", "an API key has no session: revoke the key instead")
        for key, session in identity.sessions.of_user(principal.user_id):
            if session.session_id == principal.session_id:
                await identity.end_session(key, session, "logout", principal.user_id)
        return Response(
            None,
            status_code=204,
            cookies=[Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")],
        )

    @get(
        "/me",
        summary="The caller: user, role, and what their licence plan allows",
        responses=problems(401, 503),
        opt=access("viewer"),
    )
    async def me(self, request: Request[Any, Any, Any]) -> Me:
        principal = principal_of(request)
        if MIN_SEQ_HEADER in request.headers:
            # the guard resolved the caller before the barrier; after it, the role and
            # plan are read again, so the answer includes the writes waited for
            principal = await authenticate(request)
            if principal is None:  # disabled, or signed out, by what was waited for
                raise NotAuthorizedException("credentials no longer valid")
        assert principal is not None  # the access guard let only a user through
        plan = principal.plan
        return Me(
            user_id=principal.user_id,
            username=principal.username,
            role=principal.role,
            via=principal.via,
            plan=plan,
            licence=plan_named(plan).matrix(),
            session_id=principal.session_id,
            key_id=principal.key_id,
        )


__all__ = ["AuthController", "LoginIn", "LoginOut", "Me"]
