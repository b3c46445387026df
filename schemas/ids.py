"""Identifiers (UUIDv7, RFC 9562, and readable aggregate ids) and the clock, kept at the edge.

Ids that become subject tokens (job, flow and runner ids) match ``ID_PATTERN``: no
dots, spaces or wildcards, so an id can never address another subject.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import UTC, datetime

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$(?!\n)"  # `$` alone accepts a final newline
_ID = re.compile(ID_PATTERN)
ID_RULE = "must be 1-128 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit"


def is_valid_id(value: str) -> bool:
    # fullmatch: ``$`` alone would accept a trailing newline
    return _ID.fullmatch(value) is not None


def uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68) << 64 & (0xFFF << 64)
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def new_id() -> str:
    return str(uuid7())


def short_id(prefix: str) -> str:
    """Readable aggregate ids like ``job_0193f2c4a1b27c3d9e8f`` (time-ordered, subject-safe)."""
    return f"{prefix}_{uuid7().hex[:20]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
