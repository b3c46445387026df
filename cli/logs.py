"""Process-wide logging: structlog lines on stderr, for people on a terminal (key=value)
and as JSON for machines elsewhere (a log file, a pipe); TB_LOG_FORMAT=console|json
chooses explicitly."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None) -> None:
    name = (level or os.environ.get("TB_LOG_LEVEL", "info")).upper()
    numeric = getattr(logging, name, logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *_rendering(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _rendering() -> list[structlog.typing.Processor]:
    chosen = os.environ.get("TB_LOG_FORMAT", "").strip().lower()
    if chosen == "json" or (chosen != "console" and not sys.stderr.isatty()):
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    # plain tracebacks: one screen per crash, and no local variables in the log
    return [
        structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    ]


_open_line = False  # a progress line without its newline is on the terminal


def announce(line: str) -> None:
    """Human-facing milestone lines (registration, connection) on stderr."""
    global _open_line
    if _open_line:
        sys.stderr.write("\n")  # below the progress bar, not glued to it
        _open_line = False
    print(line, file=sys.stderr, flush=True)


def progress_line(text: str) -> None:
    """Redraw the current line (a progress bar); the next ``announce`` starts a new one."""
    global _open_line
    sys.stderr.write(f"\r{text}")
    sys.stderr.flush()
    _open_line = True


def end_progress_line() -> None:
    global _open_line
    if _open_line:
        sys.stderr.write("\n")
        sys.stderr.flush()
        _open_line = False
