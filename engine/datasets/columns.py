"""Column names as operators write them, matched without regard to case, spaces, dashes
or underscores (``Flow Target``, ``flow-target`` and ``flowTarget`` are one column)."""

from __future__ import annotations

import re

from engine.errors import Rejected
from schemas.events import DatasetFormat, DatasetKind

_IGNORED = re.compile(r"[\s_\-]+")

# spelling (normalised) -> the row's field
COLUMNS: dict[DatasetKind, dict[str, str]] = {
    "targets": {
        "id": "id",
        "url": "url",
        "type": "type",
        "source": "source",
        "keyword": "keyword",
        "flowtarget": "flow_target",
        "flows": "flow_target",
        "clicktarget": "click_target",
        "clicks": "click_target",
        "referrer": "referrer",
        "referer": "referrer",
    },
    "proxies": {
        "scheme": "scheme",
        "protocol": "scheme",
        "host": "host",
        "port": "port",
        "username": "username",
        "user": "username",
        "password": "password",
        "pass": "password",
        "label": "label",
        "country": "country",
        "enabled": "enabled",
        "bypass": "bypass",
        "dns": "dns",
    },
    "devices": {
        "name": "name",
        "device": "name",
        "useragent": "user_agent",
        "ua": "user_agent",
        "viewport": "viewport",
        "devicescalefactor": "device_scale_factor",
        "dpr": "device_scale_factor",
        "ismobile": "is_mobile",
        "mobile": "is_mobile",
        "hastouch": "has_touch",
        "touch": "has_touch",
        "locale": "locale",
        "timezone": "timezone",
        "timezoneid": "timezone",
        "os": "os",
        "osfamily": "os",
        "browser": "browser",
        "browserfamily": "browser",
    },
    "settings": {},
}
# family names as operators write them -> as profiles name them
FAMILY_ALIASES: dict[str, str] = {
    "win": "windows",
    "mac": "macos",
    "osx": "macos",
    "macosx": "macos",
    "ipados": "ios",
    "chrome": "chromium",
    "edge": "chromium",
    "safari": "webkit",
}
REQUIRED: dict[DatasetKind, tuple[str, ...]] = {
    "targets": ("url",),
    "proxies": ("scheme", "host", "port"),
    "devices": (),
    "settings": (),
}


def normalised(name: str) -> str:
    return _IGNORED.sub("", name).lower()


def field_of(kind: DatasetKind, column: str) -> str | None:
    """The row field a column header names, or ``None`` for a column we do not read."""
    return COLUMNS[kind].get(normalised(column))


# tables for lists, json for profiles (a device or settings profile is nested)
FORMATS: dict[DatasetKind, tuple[DatasetFormat, ...]] = {
    "targets": ("csv", "txt", "xlsx", "docx", "json"),
    "proxies": ("csv", "txt", "xlsx", "docx", "json"),
    "devices": ("json",),
    "settings": ("json",),
}


def check_format(kind: DatasetKind, fmt: DatasetFormat) -> None:
    if fmt not in FORMATS[kind]:
        raise Rejected("format", f"{kind} come as {' or '.join(FORMATS[kind])}, not {fmt}")
