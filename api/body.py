"""Checks on a raw request body before anything decodes it.

A decoder recurses once per level of nesting: a body nested a thousand levels deep
exhausts the stack inside the decoder (a 500) long before any schema can refuse it.
Every body the API accepts is a few levels deep, so deeper ones are refused first.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request

from engine.errors import Invalid

MAX_JSON_DEPTH = 32

# a JSON string (escapes included, an unterminated one runs to the end) or a bracket:
# brackets inside strings nest nothing, and each byte is looked at once
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in ``body`` (0 for a scalar); not a validator."""
    depth = deepest = 0
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


async def refuse_deep_json(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: runs before the handler's body is decoded."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    body = await request.body()  # kept on the request: the handler's decoder reads it again
    if body and json_depth(body) > MAX_JSON_DEPTH:
        raise Invalid("body", f"JSON must nest at most {MAX_JSON_DEPTH} levels deep")
