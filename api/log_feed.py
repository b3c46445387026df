"""Job log lines for the live clients of ``/ws`` (``logLine``), and the saving of
ended jobs' logs: both run beside the API for as long as it serves.

The feed hands each line to the live hub, which sends it to the clients that want its
job and drops a client that does not keep up, as it does for every live message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from litestar import Litestar
from nats.aio.msg import Msg

from api.live_hub import LiveHub
from api.services import Services
from engine.bus import Bus
from engine.cancellation import stop_task
from engine.job_logs import save_log
from projections import queries
from schemas import subjects
from schemas.logs import LogLevel, decode_log_lines
from schemas.values import TERMINAL_JOB_STATUSES

log = structlog.get_logger("tb.api")

SAVED_MEMORY = 10_000  # job ids remembered as saved by this process
SAVE_TRIES = 5


class LogLineUpdate(msgspec.Struct, tag="logLine", tag_field="type"):
    job_id: str
    level: LogLevel
    message: str
    at: datetime
    source: str


class LogFeed:
    """Every job log line, as it is published, to the live hub: a ``logLine`` reaches the
    clients that chose its job and those that chose none (the dashboard), under the
    hub's own rule for slow clients."""

    def __init__(self, bus: Bus, hub: LiveHub) -> None:
        self.bus, self.hub = bus, hub
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.bus.nc.subscribe(subjects.ALL_LOGS, cb=self._on_line)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_line(self, msg: Msg) -> None:
        if not self.hub.clients:
            return  # nobody to tell
        try:
            lines = decode_log_lines(msg.data)  # one, or a runner's lines sent together
        except msgspec.DecodeError:
            return  # not a log line: nothing to show
        for line in lines:
            update = LogLineUpdate(line.job_id, line.level, line.message, line.at, line.source)
            self.hub.publish(line.job_id, update)


class LogSaver:
    """Saves the log of each job that ends while this API runs, ``save_after`` seconds
    after it ended (lines on their way get there first). A log saved before (by another
    replica, or before a read model rebuild) is left as it is, and so is the log of a
    job that ended longer ago than ``TB_LOGS`` keeps lines."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.due: dict[str, tuple[float, int]] = {}  # job id -> (when, tries so far)
        self.saved: OrderedDict[str, None] = OrderedDict()

    async def run(self) -> None:
        projector = self.services.projector
        updates = projector.subscribe()
        try:
            while True:
                wait = min((when for when, _ in self.due.values()), default=None)
                with contextlib.suppress(TimeoutError):
                    timeout = None if wait is None else max(wait - time.monotonic(), 0)
                    async with asyncio.timeout(timeout):
                        update = await updates.get()
                        await self._note(update.job_ids)
                await self._save_due()
        finally:
            projector.unsubscribe(updates)

    async def _note(self, job_ids: set[str]) -> None:
        keep = timedelta(seconds=self.services.config.bus.logs_max_age)
        now = datetime.now(UTC)
        for job_id in job_ids:
            if job_id in self.saved or job_id in self.due:
                continue
            view = await queries.get_job(self.services.db, job_id)
            if view is None or view.status not in TERMINAL_JOB_STATUSES:
                continue
            if view.finished_at is not None and view.finished_at < now - keep:
                continue  # its lines have aged out of TB_LOGS: nothing to save
            self.due[job_id] = (time.monotonic() + self.services.config.logs.save_after, 0)

    async def _save_due(self) -> None:
        now = time.monotonic()
        for job_id, (when, tries) in list(self.due.items()):
            if when > now:
                continue
            del self.due[job_id]
            try:
                if not await self._saved_before(job_id):
                    lines = await save_log(self.services.bus, job_id)
                    log.info("job_log.saved", job_id=job_id, lines=lines)
            except (nats.errors.Error, TimeoutError) as err:  # try again later, a few times
                if tries + 1 < SAVE_TRIES:
                    self.due[job_id] = (now + 2.0 * 2**tries, tries + 1)
                else:
                    log.warning("job_log.not_saved", job_id=job_id, error=repr(err))
                continue
            self.saved[job_id] = None
            if len(self.saved) > SAVED_MEMORY:
                self.saved.popitem(last=False)

    async def _saved_before(self, job_id: str) -> bool:
        store = await self.services.bus.js.object_store(subjects.LOGS_BUCKET)
        try:
            await store.get_info(subjects.saved_log_name(job_id))
        except (nats.js.errors.NotFoundError, nats.js.errors.ObjectDeletedError):
            return False
        return True


@contextlib.asynccontextmanager
async def job_logs_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Runs after the app's main lifespan has put its services on ``app.state``."""
    services: Services = app.state.services
    feed = LogFeed(services.bus, app.state.live_hub)
    await feed.start()
    saver = asyncio.create_task(LogSaver(services).run(), name="job-log-saver")
    try:
        yield
    finally:
        await stop_task(saver)
        await feed.stop()
