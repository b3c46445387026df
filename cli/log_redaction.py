"""Secrets never reach a log line: values under secret-sounding keys, credentials inside
URLs, bearer tokens, and the secret settings' own values wherever they turn up (an
exception message, an object's repr) are replaced by ``***``.

Two passes: ``redact_event`` on the structured event (by key, recursively), then
``RedactText`` on the rendered line, which also catches what a repr or a traceback
carried past the first pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# a key is secret when one of its words is one of these ("session_token", "Set-Cookie"),
# or when its last word is "key" ("api_key", "X-API-Key"; not "key_id")
SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "authorization",
        "cookie",
        "credentials",
        "creds",
        "jwt",
        "apikey",
        "nkey",
        "seed",
    }
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# scheme://userinfo@ : keeps the user name, hides the password (or a bare token)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<info>[^@\s/?#\"']+)@")
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)
MIN_KNOWN_SECRET = 6  # shorter values would mask ordinary words
# switches that happen to have a secret-sounding name (TB_CORS_CREDENTIALS=false)
_NOT_SECRET_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "enabled", "disabled"})


def is_secret_name(name: str) -> bool:
    words = [w.lower() for w in _WORD.findall(name)]
    return bool(words) and (words[-1] == "key" or any(w in SECRET_WORDS for w in words))


def _userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match.group("info").partition(":")
    return f"{match.group('scheme')}{user}:{MASK}@" if sep else f"{match.group('scheme')}{MASK}@"


class RedactText:
    """Masks credentials in a text; ``known`` are exact secret values to mask too (the
    environment's secret settings, see ``secret_values_from_env``)."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        values = sorted({v for v in known if len(v) >= MIN_KNOWN_SECRET}, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, values))) if values else None

    def text(self, value: str) -> str:
        value = _URL_USERINFO.sub(_userinfo, value)
        value = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", value)
        return self._known.sub(MASK, value) if self._known else value

    def value(self, value: Any) -> Any:
        """``value`` with every string in it masked, dicts by key as well."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                k: MASK if isinstance(k, str) and is_secret_name(k) else self.value(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

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
        if is_secret_name(k) and v.strip().lower() not in _NOT_SECRET_VALUES
    ]
    for value in env.values():
        for match in _URL_USERINFO.finditer(value):
            found.append(match.group("info").partition(":")[2] or match.group("info"))
    return found


def redact_event(redact: RedactText) -> Any:
    """structlog processor: secret-named keys masked, the rest masked by value."""

    def processor(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        return {
            k: MASK if is_secret_name(k) and v is not None else redact.value(v)
            for k, v in event_dict.items()
        }

    return processor
