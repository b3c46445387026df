"""Errors a caller can act on; each names the field and the rule."""

from __future__ import annotations


class Rejected(Exception):
    """A command that would break a rule: 4xx to the caller, nothing appended."""

    status_code = 422

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


class NotFound(Rejected):
    status_code = 404
