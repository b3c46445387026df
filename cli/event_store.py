"""Reach a state directory's event log, whether the system runs or not.

Commands that only read the log (``tb replay``, ``tb quarantine``) connect to the
running system's NATS; when nothing serves the state dir's store they serve it
themselves on a private loopback port for as long as they need it, and stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import nats.errors

from cli.logs import announce
from cli.nats_auth import with_local_credentials
from cli.nats_server import port_is_open, start_nats_server_on_any_port
from cli.reach import redacted
from cli.settings import bus_config_from_env
from cli.state_dir import StateDir, StateDirBusy
from engine.bus import Bus

CONNECT_TIMEOUT = 5.0  # the whole command fails within 10 s, Python start-up included


class Unreachable(Exception):
    """No event log to read: the message says where it looked and what to do."""


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 4222


def _listening(url: str) -> bool:
    return port_is_open(*_address(url))


async def connect_within(url: str, name: str, timeout: float = CONNECT_TIMEOUT) -> Bus:
    """Connect, or raise ``Unreachable`` naming the URL after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await Bus.connect(url, name=name, config=bus_config_from_env())
    except (TimeoutError, OSError, nats.errors.Error) as err:
        why = "connection refused" if not _listening(url) else f"no NATS answer ({err!r})"
        shown = redacted(url)
        raise Unreachable(f"cannot reach NATS at {shown} within {timeout:.0f}s: {why}") from None


@contextlib.asynccontextmanager
async def event_store(
    state: StateDir, *, nats_url: str | None, nats_port: int, name: str
) -> AsyncIterator[Bus]:
    """A bus on the event log of ``state``.

    ``nats_url`` given: that server or ``Unreachable`` within 10 s. Otherwise the
    server a running ``tb up`` recorded for the state dir, then whatever listens on
    ``nats_port``; with nothing listening, the state dir's own store, served here.
    """
    if nats_url is not None:
        url = nats_url
    else:
        local = f"nats://127.0.0.1:{nats_port}"
        candidates = [u for u in (state.recorded_nats_url(), local) if u]
        url = next((u for u in candidates if _listening(u)), "")
    if url:
        if nats_url is None:  # the state dir's own running system: its credentials
            url = with_local_credentials(state.root / "nats", url)
        bus = await connect_within(url, name)
        try:
            yield bus
        finally:
            await bus.close()
        return
    if not state.has_event_store():
        raise Unreachable(
            f"nothing listens on nats://127.0.0.1:{nats_port} and {state.store} holds no "
            f"event store: start the system (tb up), or pass --nats-url or --state-dir"
        )
    try:
        with state.owned():
            async with _served(state, name) as bus:
                yield bus
    except StateDirBusy as err:
        raise Unreachable(
            f"{err}, but its NATS does not answer at {state.recorded_nats_url() or 'its URL'}: "
            f"pass --nats-url"
        ) from None


@contextlib.asynccontextmanager
async def _served(state: StateDir, name: str) -> AsyncIterator[Bus]:
    try:
        proc, port = await start_nats_server_on_any_port(state.store)
    except TimeoutError as err:
        raise Unreachable(f"cannot serve {state.store}: {err}") from None
    announce(f"[INFO] The system is stopped: reading {state.store} on nats://127.0.0.1:{port}")
    try:
        bus = await connect_within(f"nats://127.0.0.1:{port}", name)
        try:
            yield bus
        finally:
            await bus.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
