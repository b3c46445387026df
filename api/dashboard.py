"""The web dashboard: one page fed by the REST API and /ws."""

from __future__ import annotations

from importlib.resources import files

from litestar import MediaType, get

from api.authz import access
from api.security_headers import page_csp

_PAGE = files("api").joinpath("static/index.html").read_text(encoding="utf-8")


@get(
    "/",
    media_type=MediaType.HTML,
    include_in_schema=False,
    response_headers={"Content-Security-Policy": page_csp(_PAGE)},
    opt=access("public"),
)
async def dashboard() -> str:
    return _PAGE
