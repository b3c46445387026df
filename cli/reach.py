"""Reaching NATS from a runner: say where, wait with back-off while it is away, and stop
for good when it refuses the credentials (retrying those would never succeed)."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from cli.supervise import Backoff

log = structlog.get_logger("tb.runner")

PROBE_TIMEOUT = 2.0  # seconds one connection attempt may take
REFUSED_PATIENCE = 5.0  # seconds of refused credentials before a runner gives up


class AuthenticationFailed(Exception):
    """NATS refused the runner's credentials."""


def redacted(url: str) -> str:
    """The URL without a password or token, for the log."""
    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password else "***"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def _refused_credentials(err: BaseException) -> bool:
    if isinstance(err, nats.errors.AuthorizationError):
        return True
    text = str(err).lower()
    return "authorization violation" in text or "authentication" in text


async def _probe(url: str) -> None:
    """One connection attempt; raises what stopped it (the socket's own error rather
    than the client's "no servers available")."""
    seen: list[Exception] = []

    async def remember(err: Exception) -> None:
        seen.append(err)  # the caller says what went wrong, once per attempt

    try:
        nc = await nats.connect(
            url,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            connect_timeout=PROBE_TIMEOUT,
            error_cb=remember,
        )
    except nats.errors.NoServersError:
        if seen:
            raise seen[-1] from None
        raise
    await nc.close()


async def until_reachable(url: str, backoff: Backoff | None = None) -> None:
    """Return once NATS at ``url`` accepts a connection; raises ``AuthenticationFailed``
    when it refuses the credentials."""
    backoff = backoff or Backoff(base=0.5, cap=10.0)
    shown = redacted(url)
    log.info("Connecting to NATS", url=shown)
    while True:
        try:
            await _probe(url)
        except (OSError, nats.errors.Error, TimeoutError) as err:
            if _refused_credentials(err):
                raise AuthenticationFailed(f"NATS at {shown} refused the credentials") from err
            delay = backoff.next_delay()
            log.warning(
                "Connection Refused, retrying",
                url=shown,
                error=str(err) or type(err).__name__,
                attempt=backoff.restarts,
                in_seconds=round(delay, 1),
            )
            await asyncio.sleep(delay)
            continue
        log.info("Connected to NATS", url=shown)
        return


async def refused_for_good(nc: Client, patience: float = REFUSED_PATIENCE) -> None:
    """Return once NATS has refused the connection's credentials (a revoked runner key:
    its user is gone) for ``patience`` seconds in a row; a brief refusal while the
    server's owner restarts and adds the users back does not count."""
    since: float | None = None
    while True:
        await asyncio.sleep(0.25)
        error = nc.last_error
        if nc.is_connected or error is None or not _refused_credentials(error):
            since = None
            continue
        since = since if since is not None else time.monotonic()
        if time.monotonic() - since >= patience:
            return
