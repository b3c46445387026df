"""A message no reader could take as an event, kept with why (DESIGN §3, quarantine)."""

from __future__ import annotations

import msgspec

from schemas.values import AwareDatetime


class QuarantinedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """Stored on ``tb.quarantine.<stream>.<seq>``; the original stays where it was."""

    stream: str
    seq: int
    subject: str
    reason: str
    raw: bytes  # base64 in JSON
    detected_by: str  # the process that found it first
    at: AwareDatetime
