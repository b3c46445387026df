"""Pagination of lists that grow: ``limit`` and an opaque ``cursor``.

A list answers its page as its body (an array, as before pagination) and, when more
follow, the cursor of the next page in the ``TB-Next-Cursor`` header (and as a
``Link: <…>; rel="next"``). A cursor is the sort key of a page's last item, so a page
is found by the index, never by skipping rows, and items added meanwhile do not shift
the pages after it. A cursor that is not one a list gave is a 400 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response
from litestar.datastructures import ResponseHeader
from litestar.params import QueryParameter

from engine.errors import Invalid

T = TypeVar("T")
NEXT_CURSOR = "TB-Next-Cursor"
MAX_LIMIT = 500
CURSOR_RULE = "must be the TB-Next-Cursor a previous page of this list answered"

Limit = Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="items per page")]
Cursor = Annotated[
    str | None,
    QueryParameter(
        description=f"where the page starts: the {NEXT_CURSOR} header of the previous page",
        max_length=1024,
    ),
]
PAGE_HEADERS = [
    ResponseHeader(
        name=NEXT_CURSOR,
        description="the cursor of the next page; absent on the last page",
        required=False,
        documentation_only=True,
    ),
    ResponseHeader(
        name="Link",
        description='the next page as `<url>; rel="next"`; absent on the last page',
        required=False,
        documentation_only=True,
    ),
]


def encode_cursor(*key: str | int) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, *shape: type[str] | type[int]) -> tuple[Any, ...]:
    """The sort key a cursor holds; 400 naming ``cursor`` unless it has ``shape``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = msgspec.json.decode(raw, type=tuple[tuple(shape)])  # type: ignore[misc]
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Invalid("cursor", CURSOR_RULE) from None
    return tuple(key)


def page(
    request: Request[Any, Any, Any],
    rows: Sequence[T],
    limit: int,
    key: Callable[[T], tuple[str | int, ...]],
) -> Response[list[T]]:
    """``rows`` holds up to ``limit + 1`` items: one more than the page says another follows."""
    items = list(rows[:limit])
    headers: dict[str, str] = {}
    if len(rows) > limit and items:
        cursor = encode_cursor(*key(items[-1]))
        url = request.url.with_replacements(query=_with_cursor(request, cursor))
        headers = {NEXT_CURSOR: cursor, "Link": f'<{url}>; rel="next"'}
    return Response(items, headers=headers)


def _with_cursor(request: Request[Any, Any, Any], cursor: str) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
    return urlencode([*params, ("cursor", cursor)])
