"""Live updates on ``/ws``, pushed after the projector applies events (no polling).

A client that sends nothing receives every job's messages and every runner and proxy
update, as the dashboard does. Sending ``{"type":"subscribe","jobs":[…]}`` narrows it
to those jobs (more ``subscribe`` adds to them, ``unsubscribe`` removes), with runner
and proxy updates only when it asks for them (``"runners": true``, ``"proxies": true``);
each is answered by a ``subscribed`` message (``unknown``: chosen jobs the read model
does not hold yet), preceded by the current ``jobInfo`` and ``progressUpdate`` of each
newly chosen job. A message that is not one of these
gets an ``error`` naming the field, and the connection stays open (up to
``MAX_REFUSALS`` of them).

A client that leaves ``live_queue`` updates unread (an update: the messages of one read
of the read model) is closed with code 1008 and a reason: it never holds back the
projector or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, WebSocket, websocket
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import WebSocketDisconnect
from litestar.status_codes import (
    WS_1000_NORMAL_CLOSURE,
    WS_1001_GOING_AWAY,
    WS_1008_POLICY_VIOLATION,
)

from api.authz import access
from api.errors import field_and_rule
from api.identity import identity_of
from api.live_auth import SESSION_EXPIRED, connection_token, session_end, socket_principal
from api.live_hub import Listener, LiveHub
from api.live_messages import (
    MAX_SUBSCRIBED_JOBS,
    LiveError,
    Subscribe,
    Subscribed,
    Unsubscribe,
    decode_client_message,
)
from api.services import Services

MAX_CLIENT_MESSAGE = 64 * 1024
MAX_REFUSALS = 100  # refused messages a connection may send before it is closed
CLOSE_GRACE = 5.0  # seconds a close frame may wait behind unread data
NOT_AUTHENTICATED = "not authenticated: log in, then connect with the token"


class TooManyRefusals(Exception):
    """A client kept sending what is refused: it is closed (1008)."""


@asynccontextmanager
async def live_hub(app: Litestar) -> AsyncIterator[None]:
    """Runs inside the app's lifespan: the hub needs the projector it follows."""
    services: Services = app.state.services
    config = services.config
    hub = LiveHub(services.projector, config.db_path, queue_size=config.live_queue)
    await hub.start()
    app.state.live_hub = hub
    try:
        yield
    finally:
        await hub.stop()


def hub_from_state(state: State) -> LiveHub:
    hub: LiveHub = state.live_hub
    return hub


@websocket(
    "/ws",
    dependencies={"hub": Provide(hub_from_state, sync_to_thread=False)},
    opt=access("viewer"),
)
async def live(socket: WebSocket[Any, Any, Any], hub: NamedDependency[LiveHub]) -> None:
    await socket.accept()
    principal = await socket_principal(socket)
    if principal is None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await socket.close(code=WS_1008_POLICY_VIOLATION, reason=NOT_AUTHENTICATED)
        return
    listener = hub.listen()
    tasks = {
        asyncio.create_task(_requests(socket, hub, listener)),
        asyncio.create_task(_send(socket, listener)),
    }
    cut_off = asyncio.create_task(listener.overflowed.wait())
    ended = asyncio.create_task(
        session_end(identity_of(socket), principal, connection_token(socket))
    )
    try:
        await asyncio.wait({*tasks, cut_off, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.unlisten(listener)
        for task in (*tasks, cut_off, ended):
            task.cancel()
        await asyncio.wait({*tasks, cut_off, ended})
    code, reason = WS_1000_NORMAL_CLOSURE, ""
    if ended.done() and not ended.cancelled():
        code, reason = WS_1008_POLICY_VIOLATION, "session expired"
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await socket.send_text(SESSION_EXPIRED)
    elif hub.stopped:
        code, reason = WS_1001_GOING_AWAY, "server stopping"
    elif cut_off.done() and not cut_off.cancelled():
        code = WS_1008_POLICY_VIOLATION
        reason = f"too slow: {listener.queue.maxsize} updates left unread"
    elif any(isinstance(t.exception(), TooManyRefusals) for t in tasks if not t.cancelled()):
        code, reason = WS_1008_POLICY_VIOLATION, f"{MAX_REFUSALS} messages refused"
    # gone already, or its unread data holds the close frame back: either way, done
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_GRACE):
            await socket.close(code=code, reason=reason)


async def _send(socket: WebSocket[Any, Any, Any], listener: Listener) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            for frame in await listener.queue.get():
                await socket.send_text(frame.text)


async def _requests(socket: WebSocket[Any, Any, Any], hub: LiveHub, listener: Listener) -> None:
    """Read the client's messages until it disconnects, or has sent ``MAX_REFUSALS``
    that were refused (each costs the server a reply)."""
    refused = 0
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while refused < MAX_REFUSALS:
            event = await socket.receive()
            if event["type"] == "websocket.disconnect":
                return
            data = event.get("text") or event.get("bytes") or b""
            if not isinstance(data, str | bytes):
                continue
            if len(data) > MAX_CLIENT_MESSAGE:
                too_long = f"at most {MAX_CLIENT_MESSAGE} bytes"
                hub.send(listener, LiveError(field="$", detail=too_long))
                refused += 1
                continue
            try:
                request = decode_client_message(data)
            except msgspec.DecodeError as err:
                hub.send(listener, _refusal(err))
                refused += 1
                continue
            await _apply(hub, listener, request)
    if refused >= MAX_REFUSALS:
        raise TooManyRefusals


async def _apply(hub: LiveHub, listener: Listener, request: Subscribe | Unsubscribe) -> None:
    if listener.jobs is None:  # the first choice: from everything to what is asked for
        listener.jobs, listener.runners, listener.proxies = set(), False, False
    jobs = listener.jobs
    fresh: set[str] = set()
    if isinstance(request, Subscribe):
        fresh = set(request.jobs) - jobs
        if len(jobs) + len(fresh) > MAX_SUBSCRIBED_JOBS:
            too_many = f"at most {MAX_SUBSCRIBED_JOBS} jobs per client"
            hub.send(listener, LiveError(field="jobs", detail=too_many))
            return
        jobs |= fresh
        listener.runners = request.runners if request.runners is not None else listener.runners
        listener.proxies = request.proxies if request.proxies is not None else listener.proxies
    else:
        jobs -= set(request.jobs)
        listener.runners = listener.runners and not request.runners
        listener.proxies = listener.proxies and not request.proxies
    # the current state of each newly chosen job first, then the answer, then changes
    unknown = await hub.snapshot(listener, fresh) if fresh else set()
    hub.send(
        listener,
        Subscribed(
            jobs=sorted(jobs),
            runners=listener.runners,
            proxies=listener.proxies,
            unknown=sorted(unknown),
        ),
    )


def _refusal(err: msgspec.DecodeError) -> LiveError:
    """msgspec says where (``… - at `$.jobs[1]```) unless the problem is at the top."""
    rule, at, path = str(err).rpartition(" - at `")
    if not at:
        rule, path = str(err), "$`"
    field, rule = field_and_rule(path.removesuffix("`").removeprefix("$").lstrip("."), rule)
    return LiveError(field=field or "$", detail=rule)
