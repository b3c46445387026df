"""Settings read from the environment, with the defaults the embedded mode uses."""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

from engine.bus import BusConfig

if TYPE_CHECKING:
    from api.services import LogsConfig
    from engine.datasets.uploads import UploadsConfig
    from engine.proxies.decider import HealthPolicy


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
    (default 5), TB_REPLICAS (1 or 3: stream replicas, 3 in a cluster), TB_LOGS_MAX_AGE
    (s, default 7 days: how long TB_LOGS keeps job log lines; at least the duplicate
    window), TB_SCREENSHOT_MAX_AGE (s, default 7 days: how long failure screenshots are
    kept)."""
    default = BusConfig()
    logs_max_age = _float("TB_LOGS_MAX_AGE", default.logs_max_age)
    if logs_max_age < default.duplicate_window:
        raise SystemExit(
            f"TB_LOGS_MAX_AGE: must be at least {default.duplicate_window:g} seconds"
            f" (the duplicate window; got {logs_max_age:g})"
        )
    return BusConfig(
        replicas=_int("TB_REPLICAS", default.replicas, allowed=(1, 3)),
        ack_wait=_float("TB_ACK_WAIT", default.ack_wait),
        presence_ttl=_float("TB_PRESENCE_TTL", default.presence_ttl),
        max_deliver=_int("TB_MAX_DELIVER", default.max_deliver),
        screenshots_max_age=_float("TB_SCREENSHOT_MAX_AGE", default.screenshots_max_age),
        logs_max_age=logs_max_age,
    )


def logs_config_from_env() -> LogsConfig:
    """TB_INGEST_API_KEY: the X-API-Key log ingest requires (unset: loopback clients
    only); TB_SSE_KEEPALIVE (s, default 15): keepalive comments of the log streams."""
    from api.services import LogsConfig

    key = os.environ.get("TB_INGEST_API_KEY", "").strip() or None
    return LogsConfig(
        ingest_api_key=key, keepalive=_float("TB_SSE_KEEPALIVE", LogsConfig().keepalive)
    )


def uploads_config_from_env() -> UploadsConfig:
    """TB_UPLOAD_MAX_SIZE (bytes, default 1 GiB): the largest dataset file;
    TB_UPLOAD_CHUNK_SIZE (bytes, default 8 MiB): the chunk size uploads are sent in (also
    the body limit of a chunk); TB_UPLOAD_LIFETIME (s, default 24 h): an upload untouched
    this long is removed with its chunks."""
    from engine.datasets.uploads import UploadsConfig

    default = UploadsConfig()
    return UploadsConfig(
        max_size=_int("TB_UPLOAD_MAX_SIZE", default.max_size),
        chunk_size=_int("TB_UPLOAD_CHUNK_SIZE", default.chunk_size),
        lifetime=_float("TB_UPLOAD_LIFETIME", default.lifetime),
    )


def stall_margin_from_env() -> float:
    """TB_STALL_MARGIN (s, default 600): how long past its planned session an in-flight
    flow may go without an end before the dispatcher records it stalled (never less
    than TB_ACK_WAIT x TB_MAX_DELIVER)."""
    from engine.dispatch.state import STALL_MARGIN

    return _float("TB_STALL_MARGIN", STALL_MARGIN.total_seconds())


def proxy_health_from_env() -> HealthPolicy:
    """TB_PROXY_FAILURES (default 3) ProxyFailed within TB_PROXY_WINDOW (s, default 60)
    mark a proxy bad for TB_PROXY_COOLDOWN (s, default 30); a failed check extends it,
    doubling, up to TB_PROXY_MAX_COOLDOWN (s, default 600); a check may take
    TB_PROXY_CHECK_TIMEOUT (s, default 5)."""
    from datetime import timedelta

    from engine.proxies.decider import HealthPolicy

    d = HealthPolicy()
    seconds = timedelta(seconds=1)
    return HealthPolicy(
        failures=_int("TB_PROXY_FAILURES", d.failures),
        window=_float("TB_PROXY_WINDOW", d.window / seconds) * seconds,
        cooldown=_float("TB_PROXY_COOLDOWN", d.cooldown / seconds) * seconds,
        max_cooldown=_float("TB_PROXY_MAX_COOLDOWN", d.max_cooldown / seconds) * seconds,
        check_timeout=_float("TB_PROXY_CHECK_TIMEOUT", d.check_timeout),
    )


def drain_grace_from_env() -> float:
    """TB_DRAIN_GRACE (s, default 30): how long a stopping runner lets its started flows
    finish before it hands them back to the queue."""
    from agents.runner import DRAIN_GRACE

    return _float("TB_DRAIN_GRACE", DRAIN_GRACE)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise SystemExit(f"{name}: must be true or false (got {raw!r})")


def headless_from_env() -> bool:
    """HEADLESS (true/false, default true): false runs the runner's browser visibly."""
    return _bool("HEADLESS", True)


def runner_job_logs_from_env() -> bool:
    """TB_RUNNER_JOB_LOGS (true/false, default true): false keeps a runner's lines about
    its flows (received, done, failed) out of the jobs' logs."""
    return _bool("TB_RUNNER_JOB_LOGS", True)


def auth_disabled_explicitly() -> bool:
    """AUTH_ENABLED=false (or 0/no/off): the operator accepts an API without login."""
    return os.environ.get("AUTH_ENABLED", "").strip().lower() in ("false", "0", "no", "off")


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1; anything else (0.0.0.0, '', a name) reaches further."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, flag: str = "--host") -> str | None:
    """Why ``host`` may not be bound, or None when it may.

    Until users and roles exist, nothing authenticates a request: binding beyond
    loopback hands the API, and with it browser traffic from this machine, to anyone
    who reaches the port.
    """
    if is_loopback(host) or auth_disabled_explicitly():
        return None
    return (
        f"{flag} {host!r}: refused: there is no authentication yet (no users or roles), so "
        f"anyone who reaches the port could create jobs and run browser traffic from this "
        f"machine. Bind to loopback (127.0.0.1, ::1, localhost), or set AUTH_ENABLED=false "
        f"to serve {host!r} without login anyway."
    )


def open_bind_warning(host: str, port: int) -> str | None:
    """The one warning printed when AUTH_ENABLED=false opens the API beyond loopback."""
    if is_loopback(host):
        return None
    return (
        f"WARNING: AUTH_ENABLED=false and --host {host!r}: the API on port {port} has no "
        f"login; anyone who reaches it can create jobs and run browser traffic"
    )


# the names runners' .env files already use, with the browsers Playwright calls them by
RUNNER_BROWSERS = {
    "chromium": "chromium",
    "chrome": "chromium",
    "firefox": "firefox",
    "webkit": "webkit",
    "safari": "webkit",
}
RUNNER_OSES = ("linux", "windows", "macos")


def runner_os_from_env() -> str | None:
    """RUNNER_OS (windows, linux or macos), when set: the platform's OS (``--os`` wins)."""
    raw = os.environ.get("RUNNER_OS", "").strip().lower()
    if not raw:
        return None
    if raw not in RUNNER_OSES:
        raise SystemExit(f"RUNNER_OS: must be one of windows, linux, macos (got {raw!r})")
    return raw


def runner_browser_from_env() -> str | None:
    """RUNNER_BROWSER (chrome, firefox or safari; or Playwright's chromium, firefox,
    webkit), when set: the platform's browser (``--browser`` wins)."""
    raw = os.environ.get("RUNNER_BROWSER", "").strip().lower()
    if not raw:
        return None
    if raw not in RUNNER_BROWSERS:
        raise SystemExit(
            f"RUNNER_BROWSER: must be one of chrome, firefox, safari (or chromium, webkit) "
            f"(got {raw!r})"
        )
    return RUNNER_BROWSERS[raw]
