"""Identifiers (UUIDv7, RFC 9562, and readable aggregate ids) and the clock, kept at the edge.

Ids that become subject tokens (job, flow and runner ids) match ``ID_PATTERN``: no
dots, spaces or wildcards, so an id can never address another subject.
"""

from __future__ import annotations

import os
import random
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


# ids need to be unique, not secret: a generator seeded from the OS (again in a forked
# child) costs a fraction of a system call per id, and every event takes one
_random = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def _uuid7_int() -> int:
    ms = time.time_ns() // 1_000_000
    rand = _random.getrandbits(80)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (rand >> 68) << 64 & (0xFFF << 64)
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return value


def uuid7() -> uuid.UUID:
    return uuid.UUID(int=_uuid7_int())


def new_id() -> str:
    """A UUIDv7 in its usual text form; every event gets one, so without ``uuid.UUID``."""
    h = f"{_uuid7_int():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def short_id(prefix: str) -> str:
    """Readable aggregate ids like ``job_0193f2c4a1b27c3d9e8f`` (time-ordered, subject-safe)."""
    return f"{prefix}_{uuid7().hex[:20]}"


def utcnow() -> datetime:
    return datetime.now(UTC)
