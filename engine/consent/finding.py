"""What looking for a claim's token found: served, absent, or the place could not be asked.

The difference between absent and unreachable is what re-verification acts on: a
token the owner took away revokes the consent ("token removed"), while a site or name
server that does not answer is only a failed check (the consent lapses at its expiry
if it never answers again).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Found(StrEnum):
    SERVED = "served"
    ABSENT = "absent"  # the place answered, without the token
    UNREACHABLE = "unreachable"  # the place did not answer


@dataclass(frozen=True)
class Finding:
    found: Found
    evidence: str  # where the token was looked for: a URL, or ``dns:<record name>``
    reason: str = ""  # why it was not served ("" when it was)

    @property
    def failure(self) -> str | None:
        return None if self.found is Found.SERVED else self.reason
