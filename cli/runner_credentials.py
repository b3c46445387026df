"""A runner's key, traded at the API for the NATS credentials it runs with."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import structlog

from cli.secrets import refuse_placeholder
from cli.supervise import Backoff
from schemas.values import Platform

log = structlog.get_logger("tb.runner")

RUNNER_KEY_ENVS = ("TB_RUNNER_KEY", "RUNNER_API_KEY")  # ours, then the name operators know
EXCHANGE_PATH = "/api/v1/runners/credentials"
KEY_HEADER = "X-Runner-Key"


class KeyRefused(Exception):
    """The API refused the key (wrong or revoked): retrying would not help."""


@dataclass(frozen=True)
class RunnerCredentials:
    runner_id: str
    nats_url: str  # with the user and password in it: never log it as is
    platform: Platform

    def __repr__(self) -> str:
        return f"RunnerCredentials(runner_id={self.runner_id!r}, nats_url=<hidden>)"


def runner_key_from_env() -> str | None:
    """The runner key of the environment; a placeholder (``secure-runner-key-CHANGE-ME``)
    stops the start naming the setting."""
    for name in RUNNER_KEY_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return refuse_placeholder(name, value)
    return None


def _with_user(url: str, user: str, password: str) -> str:
    """Each server of a (comma-separated) NATS URL, with the user and password."""
    parts = []
    for one in url.split(","):
        split = urlsplit(one if "://" in one else f"nats://{one}")
        host = split.netloc.rsplit("@", 1)[-1]
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        parts.append(urlunsplit(split._replace(netloc=netloc)))
    return ",".join(parts)


def _post(url: str, key: str, body: dict[str, str], timeout: float) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header(KEY_HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except ValueError:
            return err.code, None


async def exchange_key(
    api_url: str, key: str, platform: Platform, *, timeout: float = 15.0
) -> RunnerCredentials:
    """The credentials for ``platform``; waits with back-off while the API is away,
    raises ``KeyRefused`` on 403."""
    url = api_url.rstrip("/") + EXCHANGE_PATH
    body: dict[str, str] = {"os": platform.os, "browser": platform.browser}
    backoff = Backoff(base=0.5, cap=10.0)
    while True:
        try:
            status, answer = await asyncio.to_thread(_post, url, key, body, timeout)
        except OSError as err:
            delay = backoff.next_delay()
            log.warning(
                "Connection Refused, retrying",
                url=api_url,
                error=str(err) or type(err).__name__,
                in_seconds=round(delay, 1),
            )
            await asyncio.sleep(delay)
            continue
        if status == 403:
            raise KeyRefused(f"the API at {api_url} refused the runner key")
        if status != 200 or not isinstance(answer, dict):
            delay = backoff.next_delay()
            log.warning("Credential exchange failed, retrying", status=status, in_seconds=delay)
            await asyncio.sleep(delay)
            continue
        return RunnerCredentials(
            runner_id=str(answer["runner_id"]),
            nats_url=_with_user(str(answer["nats_url"]), answer["user"], answer["password"]),
            platform=platform,
        )
