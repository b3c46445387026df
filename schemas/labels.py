"""Runner labels: ``key=value`` pairs an operator gives a runner to tell runners apart
(region, network, team). A runner advertises them; nothing routes work by them yet."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated

import msgspec

LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$(?!\n)"
LABEL_KEY_RULE = (
    "1-63 characters of A-Z, a-z, 0-9, '_', '.' and '-', starting with a letter or digit"
)
MAX_LABELS = 32
MAX_VALUE = 200

LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY_PATTERN, min_length=1, max_length=63)]
LabelValue = Annotated[str, msgspec.Meta(max_length=MAX_VALUE)]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=MAX_LABELS)]

_KEY = re.compile(LABEL_KEY_PATTERN)


class BadLabel(ValueError):
    """A label that breaks a rule; the message names the label and the rule."""


def parse_label(text: str) -> tuple[str, str]:
    """``key=value`` (the value may be empty and may contain ``=``)."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
        raise BadLabel(f"{text!r} must be key=value")
    if _KEY.fullmatch(key) is None:
        raise BadLabel(f"{text!r}: the key must be {LABEL_KEY_RULE}")
    if len(value) > MAX_VALUE or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise BadLabel(
            f"{text!r}: the value must be at most {MAX_VALUE} characters without control characters"
        )
    return key, value


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """Labels from ``key=value`` items, later ones overriding earlier ones of the same key."""
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_label(item)
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise BadLabel(f"at most {MAX_LABELS} labels (got {len(labels)})")
    return labels


def split_label_list(text: str) -> list[str]:
    """``TB_RUNNER_LABELS``: items separated by commas; blanks between them are ignored."""
    return [item for item in (part.strip() for part in text.split(",")) if item]
