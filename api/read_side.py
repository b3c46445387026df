"""What every route of the API gets: the ``TB-Min-Seq`` read barrier and request timing.

Added at start-up (``on_app_init``) so routes added by any module get them too, with
the answers the barrier can give documented on each operation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from litestar import Controller, Request
from litestar.config.app import AppConfig
from litestar.handlers import HTTPRouteHandler
from litestar.plugins import InitPlugin

from api.openapi import problems
from api.reads import MIN_SEQ_PARAMETERS, wait_for_header_seq
from api.request_latency import RequestLatency


class ReadSide(InitPlugin):
    def __init__(self) -> None:
        self.latency = RequestLatency()

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.parameters = {**app_config.parameters, **MIN_SEQ_PARAMETERS}
        earlier = list((app_config.before_request and [app_config.before_request]) or [])

        async def before_request(request: Request[Any, Any, Any]) -> None:
            for hook in earlier:
                await hook(request)
            await wait_for_header_seq(request)

        app_config.before_request = before_request
        app_config.middleware = [self.latency.middleware, *app_config.middleware]
        app_config.state["request_latency"] = self.latency
        barrier = problems(400, 409)
        for handler in _http_handlers(app_config.route_handlers):
            handler.responses = {**barrier, **(handler.responses or {})}
        return app_config


def _http_handlers(handlers: Any) -> Iterator[HTTPRouteHandler]:
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            yield handler
        elif isinstance(handler, type) and issubclass(handler, Controller):
            for value in vars(handler).values():
                if isinstance(value, HTTPRouteHandler):
                    yield value
