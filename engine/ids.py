"""Time-ordered identifiers (UUIDv7, RFC 9562) and the clock, kept at the edge."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime


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
