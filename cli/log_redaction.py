"""Secrets never reach a log line: values under secret-sounding keys, credentials inside
URLs, bearer tokens, and the secret settings' own values wherever they turn up (an
exception message, an object's repr) are replaced by ``***``.

Two passes: ``redact_by_key`` on the structured event (by key, recursively), then
``RedactText`` on the rendered line (by value), which sees whatever a message, a repr
or a traceback carried into it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

MASK = "***"

# a key is secret when one of its words is one of these ("session_token", "Set-Cookie"),
# or when its last word is "key" ("api_key", "X-API-Key"; not "key_id")
SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "authorization",
        "cookie",
        "credentials",
        "creds",
        "jwt",
        "apikey",
        "nkey",  # an NKey seed; a plain "seed" here is a job's random seed, no secret
    }
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# scheme://user[:password]@ : keeps the user name, hides the password (or a bare token);
# a password may hold a "/" (base64) though RFC 3986 wants it escaped
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^@\s/?#\"':]*(?::[^@\s\"']*)?)@"
)
# "Authorization: Basic dXNlcjpwYXNz" in a text, and a bearer token anywhere; a token
# has a digit or a sign in it, so "Bearer authentication failed" stays readable
_AUTH_HEADER = re.compile(
    r"(?P<name>\b(?:Proxy-)?Authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(?:Basic|Bearer|Token|Digest)\s+)?[^\s\"',;}]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\bBearer\s+(?=[\w.~+/=-]*[\d.~+/=-])[\w.~+/=-]{8,}", re.IGNORECASE)
MIN_KNOWN_SECRET = 6  # shorter values would mask ordinary words
# switches that happen to have a secret-sounding name (TB_CORS_CREDENTIALS=false)
_NOT_SECRET_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "enabled", "disabled"})


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(name)]


@functools.lru_cache(maxsize=1024)  # a process logs the same few keys over and over
def is_secret_name(name: str) -> bool:
    words = _words(name)
    return bool(words) and (words[-1] == "key" or any(w in SECRET_WORDS for w in words))


def is_secret_setting(name: str) -> bool:
    """An environment variable holding a secret names it last (TB_ADMIN_PASSWORD,
    RUNNER_API_KEY, JWT_SECRET); PASSWORD_STORE_DIR only points at some."""
    words = _words(name)
    return bool(words) and (words[-1] == "key" or words[-1] in SECRET_WORDS)


def _userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match.group("info").partition(":")
    return f"{match.group('scheme')}{user}:{MASK}@" if sep else f"{match.group('scheme')}{MASK}@"


class RedactText:
    """Masks credentials in a text; ``known`` are exact secret values to mask too (the
    environment's secret settings, see ``secret_values_from_env``)."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        secrets = {v for v in known if len(v) >= MIN_KNOWN_SECRET}
        # as a JSON line spells them too (a quote or a backslash in a secret is escaped)
        secrets |= {json.dumps(v)[1:-1] for v in secrets}
        values = sorted(secrets, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, values))) if values else None

    def text(self, value: str) -> str:
        # substring checks first: most lines hold no URL and no header, and a regex
        # search costs more than the whole rest of a line's rendering
        if "://" in value and "@" in value:
            value = _URL_USERINFO.sub(_userinfo, value)
        if "uthorization" in value or "UTHORIZATION" in value:
            value = _AUTH_HEADER.sub(lambda m: f"{m.group('name')}{MASK}", value)
        if "earer" in value or "EARER" in value:
            value = _BEARER.sub(f"Bearer {MASK}", value)
        return self._known.sub(MASK, value) if self._known else value

    def __call__(self, _: Any, __: str, rendered: Any) -> Any:
        """Last processor, after the renderer: the line as written."""
        return self.text(rendered) if isinstance(rendered, str) else rendered


def secret_values_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names say they are secrets
    (TB_INGEST_API_KEY, TB_ADMIN_PASSWORD, RUNNER_API_KEY, JWT_SECRET, …), and the
    passwords inside URL-valued ones (``nats://user:password@host``)."""
    env = os.environ if environ is None else environ
    found = [
        v.strip()
        for k, v in env.items()
        if is_secret_setting(k) and v.strip().lower() not in _NOT_SECRET_VALUES
    ]
    for value in env.values():
        for match in _URL_USERINFO.finditer(value):
            found.append(match.group("info").partition(":")[2] or match.group("info"))
    return found


_SCALARS = (str, int, float, bool, type(None))


def _by_key(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value  # most values: nothing below them (and the ABC check costs)
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and is_secret_name(k) and v is not None else _by_key(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_by_key(v) for v in value]
    return value


def redact_by_key(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """structlog processor: values under secret-named keys masked, however deep (a dict
    of headers); what a value says is masked later, on the rendered line (``RedactText``)."""
    return _by_key(event_dict)  # type: ignore[no-any-return]
