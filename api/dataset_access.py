"""The caller as the dataset rules see them, and the plan a proxies import is checked
against: each resolved in one place, so identity and licences plug in here alone."""

from __future__ import annotations

from typing import Any

from litestar import Request

from api.authz import actor_of, principal_of
from api.licences import check_feature
from api.services import Services
from engine.datasets.access import Reader
from schemas.events import DatasetKind


def reader_of(connection: Any) -> Reader:
    """The logged-in user (admins see every dataset); with no identity on the request,
    the ``api`` user that ``actor_of`` records as well."""
    principal = principal_of(connection)
    if principal is None:
        return Reader(actor_of(connection))
    return Reader(principal.user_id, admin=principal.role == "admin")


async def check_import(
    services: Services, request: Request[Any, Any, Any], kind: DatasetKind
) -> None:
    """Proxies may be imported only on a plan with ``proxy_import`` (403 otherwise)."""
    if kind == "proxies":
        await check_feature(services, request, "proxy_import", "kind")
