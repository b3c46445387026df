"""Runners and the platforms they make available right now."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency, Provide

from api.deps import services_from_state
from api.dto import AvailablePlatform
from api.services import Services
from engine.presence import online_runners
from schemas.presence import RunnerPresence


class RunnerController(Controller):
    path = "/api/v1/runners"
    tags = ["runners"]
    dependencies = {"services": Provide(services_from_state, sync_to_thread=False)}

    @get("/", summary="Runners online now (presence heartbeat within its TTL)")
    async def list_runners(self, services: NamedDependency[Services]) -> list[RunnerPresence]:
        return await online_runners(services.bus)

    @get("/available-platforms", summary="Platforms with a runner online now")
    async def available_platforms(
        self, services: NamedDependency[Services]
    ) -> list[AvailablePlatform]:
        platforms: dict[tuple[str, str], AvailablePlatform] = {}
        for runner in await online_runners(services.bus):
            if runner.status != "online":
                continue
            key = (runner.os, runner.browser)
            seen = platforms.get(key, AvailablePlatform(runner.os, runner.browser, 0, 0))
            platforms[key] = AvailablePlatform(
                runner.os, runner.browser, seen.runners + 1, seen.slots + runner.slots
            )
        return [platforms[k] for k in sorted(platforms)]
