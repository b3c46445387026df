"""A file to rows: every record checked, duplicates kept once, rows written as JSON lines.

Streaming end to end: records are read one at a time, each valid row is encoded to the
output at once, and duplicates are found by a 64-bit hash of the encoded row (a set of
integers, not of rows). A file with any bad row is refused whole: up to ``MAX_ERRORS``
problems name its rows, and the caller stores nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from engine.datasets.columns import FAMILY_ALIASES, normalised
from engine.datasets.tables import FileRefused, Problem, Record, records
from schemas.datasets import ROW_TYPES, DeviceRow, Row
from schemas.device_catalogue import DeviceCatalogue
from schemas.events import DatasetFormat, DatasetKind
from schemas.proxies import ProxyUrlInvalid, parse_proxy_url

MAX_ERRORS = 50
DUPLICATE = "duplicate of an earlier row: kept once"
MAX_WARNINGS = 100
FLUSH_BYTES = 1 << 20

_AT_PATH = re.compile(r"^(.*) - at `\$\.?([^`]*)`$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")
_FIELD_RULE = re.compile(r"([a-z_][a-z0-9_]*) (.+)", re.DOTALL)
_TRUE = {"true", "yes", "y", "1", "on", "enabled", "enable"}
_FALSE = {"false", "no", "n", "0", "off", "disabled", "disable"}


@dataclass
class Parsed:
    """What parsing found: ``rows`` written (duplicates once), the written bytes' sha256 and
    size, ``warnings`` (duplicates, ignored columns) and ``errors`` (any: refuse the file)."""

    rows: int = 0
    sha256: str = ""
    size: int = 0
    warnings: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    more_warnings: int = 0  # duplicates past MAX_WARNINGS, counted only


def parse_file(
    path: Path,
    kind: DatasetKind,
    fmt: DatasetFormat,
    out: BinaryIO,
    catalogue: DeviceCatalogue | None = None,
) -> Parsed:
    """Read ``path`` as ``fmt`` holding ``kind`` rows; write the valid rows to ``out``.
    ``catalogue``: the device catalogue in use, whose names device rows must give (None:
    names are not checked here, only when a job uses them)."""
    parsed = Parsed()
    row_type = ROW_TYPES[kind]
    encoder = msgspec.json.Encoder()
    digest = hashlib.sha256()
    seen: set[int] = set()
    buffer = bytearray()
    try:
        notes: list[Problem] = []
        for record in records(path, kind, fmt, notes):
            if notes:
                parsed.warnings.extend(notes)
                notes.clear()
            row = _row(record, row_type, parsed)
            if isinstance(row, DeviceRow) and catalogue is not None:
                row = _known_device(row, record, catalogue, parsed)
            if row is None or parsed.errors:
                if len(parsed.errors) >= MAX_ERRORS:
                    break
                continue
            start = len(buffer)
            encoder.encode_into(row, buffer, start)
            buffer.extend(b"\n")
            key = int.from_bytes(hashlib.blake2b(buffer[start:], digest_size=8).digest(), "big")
            if key in seen:
                del buffer[start:]
                _warn(
                    parsed,
                    Problem(record.row, "", "duplicate of an earlier row: kept once", record.place),
                )
                continue
            seen.add(key)
            parsed.rows += 1
            if len(buffer) >= FLUSH_BYTES:
                _flush(buffer, out, digest, parsed)
    except FileRefused as refused:
        parsed.errors.append(refused.problem)
    if parsed.errors:
        return parsed
    if parsed.rows == 0:
        parsed.errors.append(Problem(0, "file", "must hold at least one row", "file"))
        return parsed
    _flush(buffer, out, digest, parsed)
    parsed.sha256 = digest.hexdigest()
    return parsed


def _flush(buffer: bytearray, out: BinaryIO, digest: Any, parsed: Parsed) -> None:
    out.write(buffer)
    digest.update(buffer)
    parsed.size += len(buffer)
    buffer.clear()


def _warn(parsed: Parsed, problem: Problem) -> None:
    if len(parsed.warnings) < MAX_WARNINGS:
        parsed.warnings.append(problem)
    else:
        parsed.more_warnings += 1


def _row(record: Record, row_type: type[Row], parsed: Parsed) -> Row | None:
    if record.problem is not None:
        parsed.errors.append(record.problem)
        return None
    values = record.values
    if "" in values:
        parsed.errors.append(Problem(record.row, "", "must be an object", record.place))
        return None
    try:
        values = _prepared(values)
        row: Row = msgspec.convert(values, row_type, strict=False)
    except ProxyUrlInvalid as err:
        parsed.errors.append(Problem(record.row, "proxy", err.rule, record.place))
        return None
    except msgspec.ValidationError as err:
        name, rule = field_and_rule(str(err))
        parsed.errors.append(Problem(record.row, name, rule, record.place))
        return None
    return row


def _known_device(
    row: DeviceRow, record: Record, catalogue: DeviceCatalogue, parsed: Parsed
) -> DeviceRow | None:
    if catalogue.knows(row.name):
        return row
    rule = f"{row.name!r} is not a device of the catalogue in use (version {catalogue.version})"
    parsed.errors.append(Problem(record.row, "name", rule, record.place))
    return None


def _prepared(values: dict[str, Any]) -> dict[str, Any]:
    """Cells as the row's types take them: a proxy URL split, yes/no as booleans, a
    bypass list from ``a.com; b.com``, scheme and DNS setting in lower case, os and
    browser families as profiles name them; numbers stay text (``strict=False`` converts)."""
    if "proxy_url" in values:
        endpoint = parse_proxy_url(values["proxy_url"])
        values = {"scheme": endpoint.scheme, "host": endpoint.host, "port": endpoint.port}
        if endpoint.has_credentials:
            values |= {"username": endpoint.username, "password": endpoint.password}
        return values
    enabled = values.get("enabled")
    if isinstance(enabled, str):
        word = enabled.strip().lower()
        values = values | {"enabled": True if word in _TRUE else False if word in _FALSE else word}
    bypass = values.get("bypass")
    if isinstance(bypass, str):
        values = values | {"bypass": [h for h in re.split(r"[\s,;]+", bypass) if h]}
    for name in ("scheme", "dns"):
        if isinstance(cell := values.get(name), str):
            values = values | {name: cell.strip().lower()}
    for family in ("os", "browser"):
        if isinstance(given := values.get(family), str):
            name = normalised(given)
            values = values | {family: FAMILY_ALIASES.get(name, name) or None}
    return values


def field_and_rule(message: str) -> tuple[str, str]:
    """The field a msgspec validation message is about, and its rule."""
    if unknown := _UNKNOWN.match(message):
        return unknown.group(1), "is not a column of this kind"
    if at := _AT_PATH.match(message):
        message, name = at.group(1), at.group(2) or ""
        if name:
            return name, message
    if own := _FIELD_RULE.fullmatch(message):
        return own.group(1), own.group(2)
    return "", message
