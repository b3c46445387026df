"""Login throttling: after a few wrong passwords in a row, each further attempt waits,
and the wait doubles with every attempt (up to a cap) until a login succeeds.

Pure: the caller brings the clock. Kept per username and per client address, so
guessing many passwords for one user, or one password for many users, both slow down.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Policy:
    free: int = 4  # wrong passwords in a row before attempts wait
    base: float = 1.0  # seconds of the first wait
    cap: float = 900.0  # longest wait

    def wait_after(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - self.free, 64))


@dataclass(frozen=True)
class Attempts:
    failures: int = 0
    blocked_until: float = 0.0


def retry_after(state: Attempts, now: float) -> float:
    """Seconds to wait before the next attempt is heard (0: go ahead)."""
    return max(0.0, state.blocked_until - now)


def failed(state: Attempts, now: float, policy: Policy) -> Attempts:
    """One more failure (a wrong password, or an attempt made while it had to wait)."""
    failures = state.failures + 1
    wait = policy.wait_after(failures)
    return replace(state, failures=failures, blocked_until=now + wait if wait else 0.0)


class Throttle:
    """The attempts of the most recent ``size`` keys (oldest forgotten first)."""

    def __init__(self, policy: Policy = Policy(), size: int = 100_000) -> None:
        self.policy, self._size = policy, size
        self._attempts: OrderedDict[str, Attempts] = OrderedDict()

    def wait(self, keys: list[str], now: float) -> float:
        return max((retry_after(self._attempts.get(k, Attempts()), now) for k in keys), default=0)

    def fail(self, keys: list[str], now: float) -> float:
        """Record a failure on every key; the wait it brings on (the policy's figure, not
        ``blocked_until - now``, which floating point may put a hair off it)."""
        waits = [0.0]
        for key in keys:
            attempts = failed(self._attempts.pop(key, Attempts()), now, self.policy)
            self._attempts[key] = attempts
            waits.append(self.policy.wait_after(attempts.failures))
            while len(self._attempts) > self._size:
                self._attempts.popitem(last=False)
        return max(waits)

    def succeed(self, keys: list[str]) -> None:
        for key in keys:
            self._attempts.pop(key, None)
