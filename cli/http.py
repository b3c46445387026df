"""A tiny JSON-over-HTTP client for the CLI (stdlib only; runs in a thread)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from cli.credentials import auth_headers


def _call(
    method: str, url: str, body: object | None, timeout: float, headers: Mapping[str, str]
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw) if raw else None
        except ValueError:
            return err.code, raw.decode("utf-8", "replace")


async def call(
    method: str,
    url: str,
    body: object | None = None,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """``headers`` replace the CLI's own credentials (``auth_headers``) when given."""
    sent = auth_headers() if headers is None else headers
    return await asyncio.to_thread(_call, method, url, body, timeout, sent)
