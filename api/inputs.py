"""What enters through paths and headers, checked before it can reach a subject.

Job ids and domains become subject tokens (``tb.job.<job_id>.*``): one that is not
well-formed (a space, a dot, a wildcard, a trailing newline) is a 400 naming the field,
and never reaches the bus.
"""

from __future__ import annotations

import re
from typing import Annotated

from litestar.params import HeaderParameter, PathParameter

from engine.consent.service import DOMAIN_RULE, checked_domain
from engine.errors import Invalid
from engine.jobs.service import checked_job_id
from schemas.ids import ID_RULE, new_id

IDEMPOTENCY_KEY = "Idempotency-Key"
KEY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
KEY_RULE = "must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'"
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# the documented shapes (the checks below are the rule: they also refuse a final newline)
JobIdPath = Annotated[
    str,
    PathParameter(
        description=f"a job id: {ID_RULE}",
        schema_extra={"pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", "maxLength": 128},
    ),
]
DomainPath = Annotated[
    str,
    PathParameter(
        description=f"a domain: {DOMAIN_RULE}",
        schema_extra={
            "pattern": rf"^{_LABEL}(\.{_LABEL})*$",
            "maxLength": 253,
        },
    ),
]


job_id_in_path = checked_job_id
domain_in_path = checked_domain


def command_id(
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name=IDEMPOTENCY_KEY,
            required=False,
            description=(
                "names this command: a retry with the same key answers what the first"
                " request stored (the same job for a create) and stores nothing again"
            ),
            schema_extra={"pattern": KEY_PATTERN, "minLength": 1, "maxLength": 128},
        ),
    ] = None,
) -> str:
    """The command's id: the caller's ``Idempotency-Key``, else one minted for this request
    (the service keeps it across its own retries)."""
    if idempotency_key is None:
        return new_id()
    if not _KEY.fullmatch(idempotency_key):
        raise Invalid(IDEMPOTENCY_KEY, KEY_RULE)
    return idempotency_key
