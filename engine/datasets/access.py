"""Who sees a dataset and who changes it: one rule, written once.

The owner and the users it is shared with see it; admins see every dataset. Only the
owner and admins change it (rename, new version, share, delete).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass


@dataclass(frozen=True)
class Reader:
    """The caller as the rule needs it: their user id and whether they are an admin."""

    user_id: str
    admin: bool = False


def may_see(reader: Reader, owner: str, shared_with: Container[str]) -> bool:
    return reader.admin or reader.user_id == owner or reader.user_id in shared_with


def may_change(reader: Reader, owner: str) -> bool:
    return reader.admin or reader.user_id == owner
