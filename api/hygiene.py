"""HTTP hygiene every route gets, whichever module adds it: CORS for the listed origins
only, the WebSocket Origin check, and the security headers on every answer.

Request bodies: the app reads at most ``ApiConfig.body_limit`` bytes of a JSON body
(``JSON_BODY_LIMIT`` unless TB_BODY_LIMIT says otherwise). A route that takes uploads
sets its own ``request_max_body_size`` (Litestar's route value wins over the app's),
from its own setting, so files never widen what JSON routes accept.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from api.origins import cors_config, no_cors_without_an_admitted_origin, websocket_origin_guard
from api.security_headers import security_headers

JSON_BODY_LIMIT = 32 * 1024


@dataclass(frozen=True)
class HttpPolicy:
    """``allowed_origins``: origins (besides the dashboard's own) whose pages may call
    the API and open /ws; ``cors_credentials``: their calls may carry the browser's
    cookies; ``hsts``: the installation is served over TLS, browsers are told to keep
    to it."""

    allowed_origins: tuple[str, ...] = ()
    cors_credentials: bool = True
    hsts: bool = False


class HttpHygiene(InitPlugin):
    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        policy = self.policy
        app_config.cors_config = cors_config(policy.allowed_origins, policy.cors_credentials)
        app_config.middleware = [
            websocket_origin_guard(policy.allowed_origins),
            *app_config.middleware,
        ]
        app_config.before_send = [
            *app_config.before_send,
            no_cors_without_an_admitted_origin,
            security_headers(hsts=policy.hsts),
        ]
        return app_config
