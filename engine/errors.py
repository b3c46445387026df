"""Errors a caller can act on; each names the field and the rule.

The status code says what kind of "no" it is: malformed input (400), something
that does not exist (404), a request that conflicts with the current state (409),
or well-formed input that breaks a rule (422).
"""

from __future__ import annotations


class Rejected(Exception):
    """A command that would break a rule: 4xx to the caller, nothing appended."""

    status_code = 422

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


class Invalid(Rejected):
    status_code = 400


class NotFound(Rejected):
    status_code = 404


class Conflict(Rejected):
    """Not possible in the current state (a cancelled job, no runner online, …)."""

    status_code = 409


class CommandIdReused(Conflict):
    """A command id (``Idempotency-Key``) that already names another command."""

    def __init__(self, stored: str) -> None:
        super().__init__(
            "Idempotency-Key",
            f"was used for another command ({stored}): use a new key for a new command",
        )
