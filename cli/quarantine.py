"""``tb quarantine``: the messages readers set aside, with why and their first bytes."""

from __future__ import annotations

from engine.bus import Bus
from engine.quarantine import list_quarantined
from schemas.quarantine import QuarantinedMessage

SHOWN_BYTES = 60


def first_bytes(raw: bytes, n: int = SHOWN_BYTES) -> str:
    """Printable on one line: non-ASCII and control bytes escaped, as in a bytes literal."""
    shown = repr(raw[:n])[2:-1]
    return shown + ("…" if len(raw) > n else "")


def describe(record: QuarantinedMessage) -> str:
    return (
        f"{record.stream} {record.seq}  {record.subject}\n"
        f"    reason: {record.reason}\n"
        f"    found:  {record.at.isoformat()} by {record.detected_by}\n"
        f"    raw:    {len(record.raw)} bytes: {first_bytes(record.raw)}"
    )


async def show_quarantined(bus: Bus, *, after: int, limit: int) -> int:
    records, cursor = await list_quarantined(bus.js, after=after, limit=limit)
    if not records:
        print("no quarantined messages" + (f" after {after}" if after else ""))
        return 0
    for record in records:
        print(describe(record))
    if len(records) == limit:
        print(f"(more may follow: tb quarantine --after {cursor})")
    return 0
