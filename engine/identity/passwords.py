"""Password hashing: argon2id at (or above) OWASP's current minimum.

OWASP's Password Storage Cheat Sheet asks for argon2id with at least 19 MiB of memory,
two iterations and one degree of parallelism. Hashing takes tens of milliseconds of CPU,
so it runs in a thread and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from engine.errors import Invalid

TIME_COST = 2
MEMORY_COST_KIB = 19456
PARALLELISM = 1
MIN_LENGTH = 12
MAX_LENGTH = 1024
PASSWORD_RULE = f"must be {MIN_LENGTH} to {MAX_LENGTH} characters long"

_hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_COST_KIB, parallelism=PARALLELISM)


def checked_password(password: str, field: str = "password") -> str:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise Invalid(field, PASSWORD_RULE)
    return password


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("a password nobody has, to spend the same time")


async def warm_up() -> None:
    """Make the dummy hash before the first login, so that login is not the slow one."""
    await asyncio.to_thread(_dummy_hash)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; with no stored hash (no such user) the same work is
    done against a dummy hash, so the time taken does not tell whether the user exists."""
    if stored_hash is None:
        await asyncio.to_thread(_verify, await asyncio.to_thread(_dummy_hash), password)
        return False
    return await asyncio.to_thread(_verify, stored_hash, password)
