"""Who may call a route: every handler declares its access level in ``opt``.

``opt={"access": "operator"}`` on a handler (or its controller/router) says the least
a caller needs. The authentication middleware puts a ``Principal`` on the connection;
the access guard compares. A route without a declared level is refused to everyone,
so a new route cannot go out open by omission.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas.events import Role

Access = Literal[
    "public",  # anyone: health, the login itself, the dashboard page
    "viewer",  # read
    "operator",  # run jobs; manage datasets, schedules, consents
    "admin",  # users, licences, runners
    "ingest",  # external workers' log ingest: an API key or TB_INGEST_API_KEY
    "runner_key",  # the runner's credential exchange: a runner key, nothing else
]
ACCESS_OPT = "access"
RANKS: dict[Role, int] = {"viewer": 1, "operator": 2, "admin": 3}


def access(level: Access) -> dict[str, Any]:
    """The ``opt`` of a handler that needs ``level``."""
    return {ACCESS_OPT: level}


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The caller, once authenticated: a user through a session or one of their API keys."""

    user_id: str
    username: str
    role: Role
    plan: str
    via: Literal["session", "api_key", "ingest_key", "anonymous"]
    session_id: str | None = None  # for ``via="session"``
    key_id: str | None = None  # for ``via="api_key"``
    scopes: frozenset[str] = frozenset()

    def at_least(self, role: Role) -> bool:
        return RANKS[self.role] >= RANKS[role]


PRINCIPAL_SCOPE_KEY = "user"  # Litestar's ``connection.user`` reads this scope entry


def principal_of(connection: Any) -> Principal | None:
    """The authenticated caller, or ``None`` on a public route nobody logged in to."""
    principal = connection.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None


def actor_of(connection: Any, default: str = "api") -> str:
    """What events record as their ``actor``: the user's id, else ``default``."""
    principal = principal_of(connection)
    return principal.user_id if principal is not None else default
