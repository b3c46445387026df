"""The dispatcher: follow the log, plan, publish; checkpoint now and then.

The pieces each own one idea: ``dispatch.reader`` folds the log (and the
dispatcher's own appends) into the state, ``dispatch.state`` plans without I/O,
``dispatch.actions`` turns planned actions into appends, ``dispatch.checkpoint``
stores and restores the state. This module composes them into one loop, which waits
out NATS trouble (``engine.transient``) instead of ending.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

import structlog

from engine.bus import Bus
from engine.cancellation import raise_if_cancelled
from engine.dispatch.actions import ActionWriter
from engine.dispatch.checkpoint import Checkpoint
from engine.dispatch.deliveries import DeliveryWatch
from engine.dispatch.reader import StateReader
from engine.dispatch.snapshot import SnapshotStore
from engine.dispatch.state import STALL_MARGIN, DispatchState
from engine.transient import Backoff, is_transient
from schemas.ids import utcnow

log = structlog.get_logger("tb.dispatcher")
T = TypeVar("T")


@dataclass
class Dispatcher:
    """Plans on every change of the state and every ``tick_interval`` seconds.

    The state is checkpointed after ``snapshot_every_events`` events the reader applied,
    or ``snapshot_interval`` seconds after the last checkpoint once the log moved on; a
    restart reads the log from the checkpoint on, not from sequence 1.

    An in-flight attempt whose end has not arrived ``stall_margin`` seconds after its
    planned session length is recorded as stalled (and dispatched again, or failed when
    its attempts are spent). The margin is never less than JetStream's own redelivery
    budget (ack wait x max deliver), so a flow the runners are still retrying is never cut;
    it counts from when its work item was seen delivered (``dispatch.deliveries``), so an
    item still waiting in the queue for a free slot is never cut either.
    """

    bus: Bus
    clock: Callable[[], datetime] = utcnow
    actor: str = "system"
    tick_interval: float = 0.5
    max_dispatches_per_tick: int = 1000
    snapshot_every_events: int = 10_000
    snapshot_interval: float = 5.0
    stall_margin: float = STALL_MARGIN.total_seconds()
    resumed_from: int = 0  # the first stream sequence this run asked the reader for
    reader: StateReader = field(init=False)
    checkpoint: Checkpoint = field(init=False)
    writer: ActionWriter = field(init=False)
    deliveries: DeliveryWatch = field(init=False)
    backoff: Backoff = field(default_factory=lambda: Backoff("dispatcher"))
    progress_every: float = 5.0  # seconds between two lines while catching up at start
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.reader = StateReader(self.bus, DispatchState(), on_change=self._wake.set)
        self.checkpoint = Checkpoint(
            SnapshotStore(self.bus), self.snapshot_every_events, self.snapshot_interval
        )
        config = self.bus.config
        margin = max(self.stall_margin, config.ack_wait * config.max_deliver)
        self.writer = ActionWriter(self.bus, self.reader, self.actor, timedelta(seconds=margin))
        self.deliveries = DeliveryWatch(self.bus)

    @property
    def state(self) -> DispatchState:
        return self.reader.state

    @property
    def saved_position(self) -> int:
        return self.checkpoint.saved_position

    async def run(self) -> None:
        """Catch up with the log before the first decision, then plan on every change."""
        target = await self._retrying(self.bus.last_seq)
        restored = await self.checkpoint.restore(target)
        if restored is not None:
            self.reader.state = restored
        self.resumed_from = self.state.position + 1
        log.info("dispatcher.resuming", start_seq=self.resumed_from, last_seq=target)
        reader = asyncio.create_task(self.reader.follow(target), name="dispatcher-reader")
        try:
            await self._until_caught_up(reader, target)
            log.info("dispatcher.ready", position=self.state.position)
            while True:
                raise_if_cancelled()
                if reader.done():
                    reader.result()
                await self._retrying(self.tick)
                self.checkpoint.maybe_save(self.state, self.reader.applied)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick_interval):
                        await self._wake.wait()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self.checkpoint.close()

    async def _retrying(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until it gets through NATS trouble; other errors propagate."""
        while True:
            try:
                result = await step()
            except Exception as err:
                if not is_transient(err, self.bus.nc):
                    raise
                self._log_lane_errors()
                await self.backoff.failed(err)
            else:
                self.backoff.succeeded()
                return result

    async def _until_caught_up(self, reader: asyncio.Task[None], target: int) -> None:
        """Wait for the reader to reach ``target``, saying how far it is now and then (a
        long log read at start is visible, not silent)."""
        caught_up = asyncio.ensure_future(self.reader.wait_caught_up())
        try:
            while not (
                await asyncio.wait(
                    [reader, caught_up],
                    timeout=self.progress_every,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            )[0]:
                log.info("dispatcher.catching_up", position=self.state.position, last_seq=target)
            if not caught_up.done():
                reader.result()  # the reader ended before catching up: raise its error
        finally:
            caught_up.cancel()

    async def wait_ready(self) -> None:
        """Return once the state has caught up with the log (planning starts then)."""
        await self.reader.wait_caught_up()

    async def wait_saved(self, position: int) -> None:
        """Return once a snapshot at ``position`` or later is stored."""
        await self.checkpoint.wait_saved(position)

    async def tick(self) -> None:
        """Carry out what is due (job transitions, flow ends), then plan dispatches on the
        state that left.

        Dispatches are planned after those appends came back, and each is checked again
        as its work item is built: what the reader folded in meanwhile (a cancel, a
        pause, a revocation) is never planned around.
        """
        await self.deliveries.observe(self.state, self.clock)
        for action in self.state.due(self.clock(), self.writer.stall_margin):
            await self.writer.carry_out(action, self.clock())
        self._log_lane_errors()
        now = self.clock()
        await self.writer.dispatch(self.state.dispatches(now, self.max_dispatches_per_tick), now)
        self._log_lane_errors()

    def _log_lane_errors(self) -> None:
        """Each job that broke, once, with its traceback; the job is ended on the next tick."""
        errors, self.state.errors = self.state.errors, []
        for e in errors:
            log.error("job.broken", job_id=e.job_id, reason=e.reason, exc_info=e.error)
