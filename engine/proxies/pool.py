"""Which proxies a flow may go through, in which order: the candidates of its work item.

A job's pool names proxies by id (that order), by label, or not at all (every registered
proxy), the latter two in the order they were registered. Only usable proxies (not
marked bad, not retired) are candidates. With proxy switching the order is rotated per
flow (and per attempt), so flows spread over the pool; without it every flow starts at
the pool's first usable proxy and fails over down the list.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.proxy_state import ProxyState
from schemas.values import ProxyPool


def members(pool: ProxyPool, proxies: Mapping[str, ProxyState]) -> list[ProxyState]:
    """The pool's proxies that exist now, in pool order, whatever their health."""
    if pool.ids:
        return [proxies[pid] for pid in pool.ids if pid in proxies]
    chosen = [p for p in proxies.values() if pool.label is None or p.label == pool.label]
    return sorted(chosen, key=lambda p: p.registered_seq)


def candidates(
    pool: ProxyPool | None, proxies: Mapping[str, ProxyState], switching: bool, turn: int
) -> list[str]:
    """The usable proxy ids of ``pool``, rotated by ``turn`` when ``switching``; empty for
    no pool (the flow connects directly) and when none is usable."""
    if pool is None:
        return []
    usable = [p.proxy_id for p in members(pool, proxies) if p.usable]
    if switching and usable:
        k = turn % len(usable)
        usable = usable[k:] + usable[:k]
    return usable
