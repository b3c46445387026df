"""Live connections (``/ws`` and the SSE streams) live only as long as their session.

A socket authenticates with the session cookie, an ``Authorization`` header, or a first
message ``{"type":"auth","token":…}`` sent within ``AUTH_WAIT`` seconds. When its
session ends (logout, a new login, expiry, the user disabled) the socket receives
``{"type":"sessionExpired"}`` and is closed; an SSE stream gets a ``sessionExpired``
event and ends. A connection made with an API key ends the same way when the key is
revoked or its user disabled. While open, a connection keeps its session from idling out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from litestar import WebSocket
from litestar.connection import ASGIConnection
from litestar.exceptions import WebSocketDisconnect
from litestar.response import ServerSentEventMessage

from api.authz import RANKS, Principal, principal_of
from api.identity import Identity, credentials_of, identity_of

AUTH_WAIT = 5.0
KEY_RECHECK = 0.5  # seconds between checks that an API key's connection may stay open
SESSION_EXPIRED = msgspec.json.encode({"type": "sessionExpired"}).decode()
SSE_SESSION_EXPIRED = ServerSentEventMessage(data=SESSION_EXPIRED, event="sessionExpired")
RAW_SSE_SESSION_EXPIRED = f"event: sessionExpired\ndata: {SESSION_EXPIRED}\n\n".encode()
T = TypeVar("T")


class AuthMessage(msgspec.Struct, tag="auth", tag_field="type"):
    token: str


async def socket_principal(socket: WebSocket[Any, Any, Any]) -> Principal | None:
    """The caller of an accepted socket: as the access guard found them, or from a first
    ``auth`` message (``None``: none came in time, or it named no live session)."""
    principal = principal_of(socket)
    if principal is not None:
        return principal
    try:
        async with asyncio.timeout(AUTH_WAIT):
            data = await socket.receive_data(mode="text")
        message = msgspec.json.decode(data, type=AuthMessage)
    except (TimeoutError, msgspec.DecodeError, WebSocketDisconnect, RuntimeError, OSError):
        return None  # no auth message in time, another message, or the client went away
    identity = identity_of(socket)
    principal = await identity.session_principal(message.token)
    if principal is None:
        principal, _ = await identity.key_principal(message.token)
    if principal is None or RANKS[principal.role] < RANKS["viewer"]:
        return None
    socket.scope["user"] = principal
    socket.scope.setdefault("state", {})["token"] = message.token
    return principal


def connection_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    token, _ = credentials_of(connection)
    state = connection.scope.get("state") or {}
    return token or state.get("token")


async def key_still_works(identity: Identity, principal: Principal) -> bool:
    if principal.key_id is None or not await identity.keys.exists(principal.key_id):
        return False
    user = await identity.user(principal.user_id)
    return user is not None and not user.disabled


async def session_end(identity: Identity, principal: Principal, token: str | None) -> None:
    """Returns when the connection's session has ended; until then it keeps the session
    from idling out. A connection made with an API key returns when the key is revoked
    or its user disabled."""
    if principal.session_id is None or token is None:
        while True:
            await asyncio.sleep(KEY_RECHECK)
            if not await key_still_works(identity, principal):
                return
    ended = identity.session_ended(principal.session_id)
    every = max(1.0, min(60.0, identity.config.sessions.idle / 2))
    while not ended.is_set():
        try:
            async with asyncio.timeout(every):
                await ended.wait()
        except TimeoutError:
            if await identity.sessions.find(token, identity.clock()) is None:
                return


async def until_session_ends(
    connection: ASGIConnection[Any, Any, Any, Any], stream: AsyncIterator[T], expired: T
) -> AsyncIterator[T]:
    """``stream``, ended by ``expired`` (a ``sessionExpired`` event) when the caller's
    session ends."""
    principal = principal_of(connection)
    if principal is None:
        async for item in stream:
            yield item
        return
    ending = asyncio.ensure_future(
        session_end(identity_of(connection), principal, connection_token(connection))
    )
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait({step, ending}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                break
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
        yield expired
    finally:
        ending.cancel()
        if step is not None and not step.done():
            step.cancel()  # the stream must stop running before it can be closed
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
