"""Settings read from the environment, with the defaults the embedded mode uses."""

from __future__ import annotations

import os

from engine.bus import BusConfig


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}: must be a number of seconds (got {raw!r})") from None
    if value <= 0:
        raise SystemExit(f"{name}: must be greater than 0 (got {raw!r})")
    return value


def bus_config_from_env() -> BusConfig:
    """TB_ACK_WAIT (s, default 60), TB_PRESENCE_TTL (s, default 15), TB_MAX_DELIVER (default 5)."""
    default = BusConfig()
    return BusConfig(
        ack_wait=_float("TB_ACK_WAIT", default.ack_wait),
        presence_ttl=_float("TB_PRESENCE_TTL", default.presence_ttl),
        max_deliver=int(_float("TB_MAX_DELIVER", default.max_deliver)),
    )
