"""The caller as the dataset rules see them, and the plan a proxies import is checked
against: each resolved in one place, so identity and licences plug in here alone."""

from __future__ import annotations

from typing import Any

from litestar import Request

from api.authz import actor_of, principal_of
from api.licences import check_feature
from api.services import Services
from engine.datasets.access import Reader, may_change, may_see
from engine.datasets.decider import Dataset
from engine.errors import NotFound, Rejected
from schemas.events import DatasetKind


class Forbidden(Rejected):
    status_code = 403


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


def check_changeable(dataset: Dataset, reader: Reader, dataset_id: str, what: str) -> None:
    """404 for a dataset the caller may not see (as if there were none), 403 for one they
    see but may not change: ``what`` names the change."""
    if (
        not dataset.exists
        or dataset.deleted
        or not may_see(reader, dataset.owner, dataset.shared_with)
    ):
        raise NotFound("dataset_id", f"no dataset {dataset_id}")
    if not may_change(reader, dataset.owner):
        raise Forbidden("dataset_id", f"only its owner or an admin may {what}")
