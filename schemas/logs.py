"""Job log lines: what runners and external workers say about a job, in ``TB_LOGS``.

A line is text as its writer sent it (``[INFO] Progress: 20% - …``); its level is read
from the prefix. Two kinds of line mean something to an external job: a progress line
sets its progress, a ``[SUMMARY] {json}`` line ends it. What a line means is decided
here, once, without I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from schemas.values import AwareDatetime, Id, Text

LogLevel = Literal["DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "SUMMARY"]
LOG_SOURCE_INGEST = "ingest"  # a line posted to the HTTP ingest (an external worker)
MESSAGE_LENGTH = 16_384
Message = Annotated[str, msgspec.Meta(max_length=MESSAGE_LENGTH)]


class LogLine(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of a job's log, stored on ``tb.log.<job_id>``: a message of its own, or
    one of the lines a runner sends together (``encode_log_lines``).

    ``source``: the runner id, or ``ingest`` for a line an external worker posted.
    ``summary``: a ``[SUMMARY]`` line's JSON object; ``flag``: what is wrong with a line
    that was kept as text (a ``[SUMMARY]`` whose JSON does not parse)."""

    job_id: Id
    level: LogLevel
    message: Message
    at: AwareDatetime
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    summary: dict[str, Any] | None = None
    flag: Text | None = None


_PREFIX = re.compile(r"\[(DEBUG|INFO|SUCCESS|WARNING|WARN|ERROR|SUMMARY)\]", re.IGNORECASE)
_PROGRESS = re.compile(r"\[INFO\]\s*Progress:\s*(\d{1,3}(?:\.\d+)?)\s*%", re.IGNORECASE)


def level_of(message: str) -> LogLevel:
    """The level a line's prefix names (``[ERROR] …``); ``INFO`` without one."""
    found = _PREFIX.match(message.lstrip())
    if found is None:
        return "INFO"
    name = found.group(1).upper()
    return "WARNING" if name == "WARN" else name  # type: ignore[return-value]


def progress_of(message: str) -> int | None:
    """The percent of a ``[INFO] Progress: N%`` line (0-100), else ``None``."""
    found = _PROGRESS.match(message.lstrip())
    if found is None:
        return None
    percent = float(found.group(1))
    return int(percent) if percent <= 100 else None


class Summary(msgspec.Struct, frozen=True):
    """What a ``[SUMMARY]`` line says: the object, or why it could not be read."""

    data: dict[str, Any] | None
    problem: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.data is not None and self.data.get("status") == "success"

    @property
    def outcome(self) -> str:
        """Why a job this summary ends failed (``""`` when it succeeded)."""
        if self.succeeded:
            return ""
        if self.data is None:
            return f"[SUMMARY] unreadable: {self.problem}"
        status = self.data.get("status")
        return f"[SUMMARY] status {status!r}" if status is not None else "[SUMMARY] without status"


_summary_decoder = msgspec.json.Decoder(dict[str, Any])


def summary_of(message: str) -> Summary | None:
    """The summary of a ``[SUMMARY] {json}`` line, else ``None`` (not a summary line)."""
    text = message.lstrip()
    if level_of(text) != "SUMMARY":
        return None
    payload = text[text.index("]") + 1 :].strip()
    try:
        return Summary(_summary_decoder.decode(payload))
    except msgspec.ValidationError:
        return Summary(None, "not a JSON object")
    except msgspec.DecodeError as err:
        return Summary(None, f"not JSON ({err})")


def log_line(
    job_id: str, message: str, at: datetime, source: str, summary: Summary | None = None
) -> LogLine:
    """The line as stored: its level read from its prefix, a summary's object or flag."""
    return LogLine(
        job_id=job_id,
        level=level_of(message),
        message=message,
        at=at,
        source=source,
        summary=summary.data if summary is not None else None,
        flag=summary.problem[:4096] if summary is not None and summary.problem else None,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogLine)
_lines_decoder = msgspec.json.Decoder(LogLine | list[LogLine])


def encode_log_line(line: LogLine) -> bytes:
    return _encoder.encode(line)


def encode_log_lines(encoded: Sequence[bytes]) -> bytes:
    """Lines of one job sent as one message: a JSON array of lines, each as
    ``encode_log_line`` gave it; one line alone is stored as a line."""
    if len(encoded) == 1:
        return encoded[0]
    return b"[" + b",".join(encoded) + b"]"


def decode_log_lines(data: bytes) -> list[LogLine]:
    """The lines one ``TB_LOGS`` message holds, in order: a line (as external workers'
    lines are stored, and every line was before runners sent theirs together) or an
    array of lines. Raises ``msgspec.DecodeError`` (or its ``ValidationError``) when it
    holds anything else, a bad line among good ones included: readers skip the message."""
    lines: LogLine | list[LogLine] = _lines_decoder.decode(data)
    return lines if isinstance(lines, list) else [lines]


def decode_log_line(data: bytes) -> LogLine:
    """Raises ``msgspec.DecodeError`` (or its ``ValidationError``) for bytes that are not
    a log line: readers skip those."""
    line: LogLine = _decoder.decode(data)
    return line
