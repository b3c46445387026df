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


def _int(name: str, default: int, allowed: tuple[int, ...] | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}: must be a whole number (got {raw!r})") from None
    if value < 1 or (allowed and value not in allowed):
        rule = f"one of {', '.join(map(str, allowed))}" if allowed else "at least 1"
        raise SystemExit(f"{name}: must be {rule} (got {raw!r})")
    return value


def bus_config_from_env() -> BusConfig:
    """TB_ACK_WAIT (s, default 60), TB_PRESENCE_TTL (s, default 15), TB_MAX_DELIVER
    (default 5), TB_REPLICAS (1 or 3: stream replicas, 3 in a cluster)."""
    default = BusConfig()
    return BusConfig(
        replicas=_int("TB_REPLICAS", default.replicas, allowed=(1, 3)),
        ack_wait=_float("TB_ACK_WAIT", default.ack_wait),
        presence_ttl=_float("TB_PRESENCE_TTL", default.presence_ttl),
        max_deliver=_int("TB_MAX_DELIVER", default.max_deliver),
    )
