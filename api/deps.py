"""Dependency providers: handlers receive services, never reach for globals."""

from __future__ import annotations

from litestar.datastructures import State

from api.services import Services


def services_from_state(state: State) -> Services:
    services: Services = state.services
    return services
