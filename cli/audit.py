"""``tb audit replay --job ID``: a job's timeline, one line per event, from the log."""

from __future__ import annotations

import shutil
import sys
import tempfile
from datetime import UTC

import msgspec

from cli.commands import ProgressBar
from engine.bus import Bus
from projections.timeline import job_timeline
from schemas.events import Envelope, Event

DETAIL_CHARS = 160
VALUE_CHARS = 48
COMMON = {"id", "at", "actor", "v", "job_id"}  # in every line's own columns, or noise


def timeline_line(env: Envelope) -> str:
    event = env.event
    at = event.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    line = f"{at}Z  #{env.seq:<7} {type(event).__name__:<16} by {event.actor:<12} {detail(event)}"
    return line.rstrip()


def detail(event: Event) -> str:
    """The event's own fields that differ from their defaults, as ``name=value``."""
    parts = []
    for info in msgspec.structs.fields(type(event)):
        if info.name in COMMON:
            continue
        value = getattr(event, info.name)
        if info.default is not msgspec.NODEFAULT and value == info.default:
            continue
        if info.default_factory is not msgspec.NODEFAULT and value == info.default_factory():
            continue
        parts.append(f"{info.name}={_short(value)}")
    text = " ".join(parts)
    return text if len(text) <= DETAIL_CHARS else f"{text[: DETAIL_CHARS - 3]}..."


def _short(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and len(value) > 3:
        text = f"[{len(value)} items]"
    else:
        text = msgspec.json.encode(value).decode()
    return text if len(text) <= VALUE_CHARS else f"{text[: VALUE_CHARS - 3]}..."


async def replay_job(bus: Bus, job_id: str) -> int:
    """Lines are spooled to a file while the progress bar runs, then printed under their
    count: a job of a million events prints without being held in memory."""
    bar = ProgressBar("reading the event log", await bus.last_seq())
    count, first, last = 0, 0, 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        async for env in job_timeline(bus, job_id, progress=bar.update):
            spool.write(timeline_line(env) + "\n")
            count, first, last = count + 1, first or env.seq, env.seq
        bar.finish()
        if not count:
            print(f"no events of job {job_id} in the event log")
            return 1
        print(f"job {job_id}: {count} events from the event log (sequences {first}-{last})")
        spool.seek(0)
        shutil.copyfileobj(spool, sys.stdout)
    return 0
