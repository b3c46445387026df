"""Settings read from the environment, with the defaults the embedded mode uses."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import structlog

from cli.secrets import refuse_placeholder
from engine.bus import BusConfig
from engine.identity.passwords import MIN_LENGTH as PASSWORD_MIN_LENGTH

if TYPE_CHECKING:
    from api.hygiene import HttpPolicy
    from api.services import IdentityConfig, LogsConfig
    from engine.datasets.uploads import UploadsConfig
    from engine.proxies.decider import HealthPolicy
    from schemas.device_catalogue import ShippedCatalogues

log = structlog.get_logger("tb.settings")


class EnvSetting(NamedTuple):
    name: str  # the variable the value came from: ours, or the alias an operator set
    value: str


def env_setting(name: str, *aliases: str) -> EnvSetting | None:
    """Setting ``name`` from the environment, else the first of its ``aliases`` that is set
    (the names operators' existing deployments use, e.g. ``BODY_LIMIT`` for
    ``TB_BODY_LIMIT``); None when none is set. Ours wins when both are set; when they
    disagree, that is logged with both names (never the values: they may be secrets).
    Error messages should name ``.name``, the variable the operator actually set.
    ``_float``, ``_int`` and ``_bool`` take ``aliases=(...)`` and do both."""
    found = [
        EnvSetting(n, v.strip()) for n in (name, *aliases) if (v := os.environ.get(n, "")).strip()
    ]
    if not found:
        return None
    chosen = found[0]
    for other in found[1:]:
        if other.value != chosen.value:
            log.warning("setting.alias_conflict", used=chosen.name, ignored=other.name)
    return chosen


def _float(name: str, default: float, aliases: tuple[str, ...] = ()) -> float:
    found = env_setting(name, *aliases)
    if found is None:
        return default
    name, raw = found
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}: must be a number of seconds (got {raw!r})") from None
    if value <= 0:
        raise SystemExit(f"{name}: must be greater than 0 (got {raw!r})")
    return value


def _int(
    name: str, default: int, allowed: tuple[int, ...] | None = None, aliases: tuple[str, ...] = ()
) -> int:
    found = env_setting(name, *aliases)
    if found is None:
        return default
    name, raw = found
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
    if key is not None:
        refuse_placeholder("TB_INGEST_API_KEY", key)
    return LogsConfig(
        ingest_api_key=key, keepalive=_float("TB_SSE_KEEPALIVE", LogsConfig().keepalive)
    )


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|kb|kib|k|mb|mib|m)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024}
_SIZE_UNITS |= {"m": 1024**2, "mb": 1024**2, "mib": 1024**2}
MAX_BODY_LIMIT = 1024**3


def parse_size(setting: str, raw: str) -> int:
    """Bytes in ``raw``: ``32768``, ``32kb``, ``1mb`` (kb = 1024 bytes, as the operators'
    earlier ``BODY_LIMIT=32kb`` meant); SystemExit naming ``setting`` otherwise."""
    match = _SIZE.fullmatch(raw.strip())
    size = match and int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    if not size or not 1 <= size <= MAX_BODY_LIMIT:
        raise SystemExit(
            f"{setting}: must be a size from 1 byte to 1gb, in bytes or with kb or mb "
            f"(e.g. 32kb; got {raw!r})"
        )
    return size


def body_limit_from_env() -> int:
    """TB_BODY_LIMIT (alias BODY_LIMIT; default 32kb): the largest JSON request body the
    API reads; a larger one is answered 413 naming the limit."""
    from api.hygiene import JSON_BODY_LIMIT

    found = env_setting("TB_BODY_LIMIT", "BODY_LIMIT")
    return parse_size(found.name, found.value) if found else JSON_BODY_LIMIT


def allowed_origins_from_env() -> tuple[str, ...]:
    """TB_ALLOWED_ORIGINS (alias ALLOWED_ORIGINS): comma-separated origins
    (``scheme://host[:port]``) whose pages may call the API from a browser; unset: the
    dashboard's own origin only. A ``*`` among them is refused while TB_CORS_CREDENTIALS
    is true: it would let any site act with the browser's login."""
    from api.origins import ANY, BadOrigin, parse_origin

    found = env_setting("TB_ALLOWED_ORIGINS", "ALLOWED_ORIGINS")
    if found is None:
        return ()
    try:
        origins = tuple(parse_origin(part) for part in found.value.split(",") if part.strip())
    except BadOrigin as err:
        raise SystemExit(f"{found.name}: {err}") from None
    if ANY in origins and _bool("TB_CORS_CREDENTIALS", True):
        raise SystemExit(
            f"{found.name}: '*' with credentials would let every site call the API as the "
            f"browser's logged-in user; list the origins, or set TB_CORS_CREDENTIALS=false"
        )
    return origins


def http_policy_from_env() -> HttpPolicy:
    """Origins (TB_ALLOWED_ORIGINS), credentials for them (TB_CORS_CREDENTIALS, default
    true) and HSTS (TB_HSTS: true when the installation is reached over TLS)."""
    from api.hygiene import HttpPolicy

    return HttpPolicy(
        allowed_origins=allowed_origins_from_env(),
        cors_credentials=_bool("TB_CORS_CREDENTIALS", True),
        hsts=_bool("TB_HSTS", False),
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(name: str, raw: str) -> float:
    """Seconds from ``90``, ``45s``, ``30m``, ``8h`` or ``1d``."""
    text = raw.strip().lower()
    scale = _UNITS.get(text[-1:]) if text else None
    try:
        value = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        rule = "must be seconds, or a number with s, m, h or d"
        raise SystemExit(f"{name}: {rule} (got {raw!r})") from None
    if value <= 0:
        raise SystemExit(f"{name}: must be greater than 0 (got {raw!r})")
    return value


def _duration(names: tuple[str, ...], default: float) -> float:
    found = env_setting(*names)
    return duration(found.name, found.value) if found else default


def identity_config_from_env() -> IdentityConfig:
    """TB_ADMIN_PASSWORD: the first user's (admin's) password, used when no user exists;
    TB_SESSION_MAX_AGE (alias JWT_EXP, default 8h): a session's absolute lifetime;
    TB_SESSION_IDLE (default 30m): unused this long, a session ends, after TB_SESSION_GRACE
    (alias GRACE_PERIOD, default 30s) more. Durations: seconds, or 45s, 30m, 8h, 1d."""
    from api.services import IdentityConfig
    from engine.identity.sessions import SessionPolicy

    default = SessionPolicy()
    policy = SessionPolicy(
        max_age=_duration(("TB_SESSION_MAX_AGE", "JWT_EXP"), default.max_age),
        idle=_duration(("TB_SESSION_IDLE",), default.idle),
        grace=_duration(("TB_SESSION_GRACE", "GRACE_PERIOD"), default.grace),
    )
    password = os.environ.get("TB_ADMIN_PASSWORD") or None
    if password is not None:
        refuse_placeholder("TB_ADMIN_PASSWORD", password, min_length=PASSWORD_MIN_LENGTH)
    return IdentityConfig(admin_password=password, sessions=policy)


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


def device_catalogues_from_env() -> ShippedCatalogues:
    """TB_DEVICE_CATALOGUES (default: the package's own): the directory of device
    catalogue versions (``<version>.json``) this process ships; it must hold one."""
    from schemas.device_catalogue import CatalogueBroken, ShippedCatalogues

    found = env_setting("TB_DEVICE_CATALOGUES")
    shipped = ShippedCatalogues() if found is None else ShippedCatalogues(Path(found.value))
    try:
        newest = shipped.newest()
    except CatalogueBroken as err:
        raise SystemExit(f"{found.name if found else 'device catalogue'}: {err}") from None
    if newest is None:
        name = found.name if found else "the package"
        raise SystemExit(f"{name}: {shipped.directory} holds no device catalogue (<version>.json)")
    return shipped


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


def _bool(name: str, default: bool, aliases: tuple[str, ...] = ()) -> bool:
    found = env_setting(name, *aliases)
    if found is None:
        return default
    name, raw = found[0], found[1].lower()
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


def auth_refusal() -> str | None:
    """TB_AUTH_ENABLED (alias AUTH_ENABLED, default true): why the setting stops a start.

    Login cannot be turned off: every route checks its caller, so ``false`` would promise
    something the API does not do. Scripts use an API key instead of a login.
    """
    if _bool("TB_AUTH_ENABLED", True, aliases=("AUTH_ENABLED",)):
        return None
    return (
        "AUTH_ENABLED=false: refused: login cannot be turned off (every route checks its"
        " caller; AUTH_ENABLED=true is the only value). Unset it; scripts and the CLI use"
        " an API key (X-API-Key, or TB_API_KEY for the CLI) instead of a login."
    )


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1; anything else (0.0.0.0, '', a name) reaches further."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def open_bind_warning(host: str, port: int) -> str | None:
    """The one warning printed when the API answers beyond loopback: it speaks plain HTTP."""
    if is_loopback(host):
        return None
    return (
        f"WARNING: --host {host!r}: the API on port {port} answers beyond loopback over plain"
        f" HTTP; passwords and session tokens cross the network unencrypted unless TLS ends"
        f" in front of it (see deploy/)"
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


def api_settings_from_env() -> None:
    """Read every setting the API takes, so that a bad one (or a placeholder secret)
    stops ``tb api`` and ``tb up`` at once, naming it."""
    logs_config_from_env()
    body_limit_from_env()
    http_policy_from_env()
