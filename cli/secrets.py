"""No secret has a working default: a placeholder or a guessable value is refused at start.

Example files and older deployments ship values such as ``secure-runner-key-CHANGE-ME``;
an installation that keeps one is open to anyone who read the same example.
"""

from __future__ import annotations

import re

MIN_SECRET_LENGTH = 16

# marks an example value someone was meant to replace
_PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|placeholder|example|xxxx", re.I)
# values that are guessed first
_WEAK = frozenset(
    {"secret", "password", "passw0rd", "admin", "changeit", "default", "letmein", "test"}
)


def refuse_placeholder(setting: str, value: str, *, min_length: int = MIN_SECRET_LENGTH) -> str:
    """``value`` when it can serve as the secret ``setting`` (an environment variable's
    name, used in the message); else SystemExit naming ``setting`` and why.

    Refused: a placeholder (``CHANGE-ME``, ``changeme``, ``example``, …), a well-known
    weak value (``secret``, ``password``, ``admin``, …), one character repeated, or fewer
    than ``min_length`` characters (16 by default: keys are machine-made; pass a
    smaller ``min_length`` for a password a person types). The value itself is never
    part of the message.
    """
    why = None
    if _PLACEHOLDER.search(value):
        why = "is a placeholder from an example"
    elif value.strip().lower() in _WEAK or len(set(value)) == 1:
        why = "is a well-known value anyone would guess"
    elif len(value) < min_length:
        why = f"is shorter than {min_length} characters"
    if why is None:
        return value
    raise SystemExit(
        f"{setting}: refused: the value {why}. Set it to a secret of your own, e.g. "
        f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
    )
