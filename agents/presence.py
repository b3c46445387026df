"""A runner's presence: its lifecycle events and its heartbeat in the ``tb_runners`` bucket.

Both say what the runner serves: platform, browser version as launched, capacity
(slots), labels and runner version; the beat adds its load. The bucket's TTL is about
three beats, so a runner that stops beating (killed, cut off) drops out of the fleet
by itself; a beat that fails is retried with back-off and never stops the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec
import nats.errors
import structlog

from agents.backoff import Backoff
from engine.bus import Bus
from schemas import VERSION, subjects
from schemas.events import (
    RunnerDeregistered,
    RunnerDraining,
    RunnerEvent,
    RunnerRegistered,
)
from schemas.ids import new_id, utcnow
from schemas.presence import RunnerPresence
from schemas.values import Platform

log = structlog.get_logger("tb.agent")


@dataclass(frozen=True)
class Load:
    """What the heartbeat tells about the runner's work."""

    running: int
    completed: int
    failed: int
    draining: bool


class Presence:
    def __init__(
        self,
        bus: Bus,
        runner_id: str,
        platform: Platform,
        slots: int,
        load: Callable[[], Load],
        interval: float = 5.0,
        *,
        browser_version: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.bus, self.runner_id, self.platform, self.slots = bus, runner_id, platform, slots
        self.load = load
        self.browser_version = browser_version
        self.labels = dict(labels or {})
        self.started_at = ""  # set when it registers
        # presence expires after the bucket's TTL: beat at least three times within it
        self.interval = min(interval, bus.config.presence_ttl / 3)
        self.hostname = socket.gethostname()
        self._retry = Backoff("runner.heartbeat", base=0.2, cap=self.interval)
        self._stop = asyncio.Event()

    async def register(self) -> None:
        """Announce the runner (event and first beat), retrying until NATS takes both."""
        started = utcnow()
        self.started_at = started.isoformat()
        registered = RunnerRegistered(
            id=new_id(),
            at=started,
            actor=self.runner_id,
            runner_id=self.runner_id,
            platform=self.platform,
            slots=self.slots,
            hostname=self.hostname,
            version=VERSION,
            browser_version=self.browser_version,
            labels=self.labels,
        )
        retry = Backoff("runner.register", base=0.2, cap=5.0)
        while True:
            try:
                await self._fit_to_bucket()
                await self._emit(registered)  # same event, same msg-id: a retry dedupes
                await self.beat()
            except nats.errors.Error as err:
                await retry.wait(err)
                continue
            retry.succeeded()
            return

    async def _fit_to_bucket(self) -> None:
        """Beat three times within the TTL the bucket really has: whoever created it first
        set it, and a runner whose own TB_PRESENCE_TTL is longer would flicker in and out
        of the fleet between beats."""
        kv = await self.bus.kv(subjects.RUNNERS_BUCKET)
        try:
            ttl = (await kv.status()).ttl
        except nats.errors.Error as err:  # not allowed to look: keep its own setting
            log.info("runner.presence_ttl_unknown", error=str(err))
            return
        if ttl and ttl / 3 < self.interval:
            log.warning(
                "runner.presence_ttl_shorter",
                bucket_ttl=ttl,
                configured=self.bus.config.presence_ttl,
            )
            self.interval = self._retry.cap = ttl / 3

    async def beat(self) -> None:
        load = self.load()
        presence = RunnerPresence(
            runner_id=self.runner_id,
            os=self.platform.os,
            browser=self.platform.browser,
            slots=self.slots,
            running=load.running,
            completed=load.completed,
            failed=load.failed,
            status="draining" if load.draining else "online",
            hostname=self.hostname,
            version=VERSION,
            last_heartbeat=utcnow().isoformat(),
            browser_version=self.browser_version,
            labels=self.labels,
            started_at=self.started_at,
        )
        kv = await self.bus.kv(subjects.RUNNERS_BUCKET)
        await kv.put(self.runner_id, msgspec.json.encode(presence))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Beat every ``interval`` seconds until ``stop``; failures back off, then beat again.

        ``stop`` ends the loop even when a cancel is lost: nats-py's request can swallow
        one that races its answer, and a heartbeat that ignored it would beat for ever.
        """
        delay = self.interval
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await self.beat()
            except nats.errors.Error as err:
                # a NATS blip must not cost the runner its presence for long: try sooner
                delay = min(self._retry.failed(err), self.interval)
                continue
            self._retry.succeeded()
            delay = self.interval

    async def draining(self) -> None:
        if not self.bus.nc.is_connected:  # a stop while NATS is away does not wait for it
            log.warning("runner.draining_not_recorded", error="not connected to NATS")
            return
        try:
            await self._emit(
                RunnerDraining(
                    id=new_id(), at=utcnow(), actor=self.runner_id, runner_id=self.runner_id
                )
            )
        except nats.errors.Error as err:
            log.warning("runner.draining_not_recorded", error=str(err))

    async def deregister(self) -> None:
        """Best effort: the presence entry expires by itself when this fails."""
        if not self.bus.nc.is_connected:
            log.warning("runner.deregister_failed", error="not connected to NATS")
            return
        try:
            await self._emit(
                RunnerDeregistered(
                    id=new_id(),
                    at=utcnow(),
                    actor=self.runner_id,
                    runner_id=self.runner_id,
                    reason="stopped",
                )
            )
            kv = await self.bus.kv(subjects.RUNNERS_BUCKET)
            await kv.delete(self.runner_id)
        except nats.errors.Error as err:
            log.warning("runner.deregister_failed", error=str(err))

    async def _emit(self, event: RunnerEvent) -> None:
        await self.bus.append(event, msg_id=subjects.runner_msg_id(event))
