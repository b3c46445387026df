"""A proxies dataset version as a job's proxy pool: each enabled row registered as a proxy
(credentials to the secrets bucket, never the log; its bypass list and DNS setting with
it), the job pooling them by id. A disabled row is not registered.

The registration of row n of a version is a keyed command (``dataset-proxy:<id>:<v>:<n>``),
so every job made from that version pools the same proxies, registered once, and their
health (marked bad, restored) carries over from one job to the next.
"""

from __future__ import annotations

from urllib.parse import quote

from engine.errors import Rejected
from engine.proxies.service import ProxyCommands
from schemas.datasets import ProxyRow
from schemas.values import DatasetRef, ProxyPool

MAX_POOL = 1000  # what a job's pool names


def proxy_url(row: ProxyRow) -> str:
    host = f"[{row.host}]" if ":" in row.host else row.host
    auth = f"{quote(row.username, safe='')}:{quote(row.password, safe='')}@" if row.username else ""
    return f"{row.scheme}://{auth}{host}:{row.port}"


def _usable(rows: list[ProxyRow]) -> list[tuple[int, ProxyRow]]:
    """The enabled rows with their row index."""
    enabled = [(n, row) for n, row in enumerate(rows) if row.enabled]
    if not enabled:
        raise Rejected("proxies_dataset", "the version has no enabled proxy")
    if len(enabled) > MAX_POOL:
        raise Rejected("proxies_dataset", f"a job pools at most {MAX_POOL} proxies")
    return enabled


async def pool_of(
    commands: ProxyCommands, ref: DatasetRef, rows: list[ProxyRow], actor: str
) -> ProxyPool:
    """Register the version's enabled proxies (a row registered before answers the same
    proxy) and pool them in row order."""
    ids: list[str] = []
    for n, row in _usable(rows):
        event, _ = await commands.register(
            proxy_url(row),
            None,
            actor,
            f"dataset-proxy:{ref.id}:{ref.version}:{n}",
            bypass=row.bypass,
            dns=row.dns,
        )
        ids.append(event.proxy_id)
    return ProxyPool(ids=ids)
