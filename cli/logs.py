"""Process-wide logging: structlog lines on stderr, for people on a terminal (key=value)
and as JSON for machines elsewhere (a log file, a pipe, ``tb up``'s children);
TB_LOG_FORMAT=console|json chooses explicitly. The standard library's loggers (uvicorn,
nats-py, asyncio) are rendered the same way, and every line goes through the redaction
of ``cli.log_redaction``: secrets never reach the log."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from cli.log_redaction import RedactText, redact_by_key, secret_values_from_env

_redact = RedactText()


def configure_logging(level: str | None = None) -> None:
    global _redact
    name = (level or os.environ.get("TB_LOG_LEVEL", "info")).upper()
    numeric = getattr(logging, name, logging.INFO)
    _redact = RedactText(secret_values_from_env())
    before: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = _renderer()
    rendering: list[structlog.typing.Processor] = [
        # the console renderer lays out a traceback itself (the last step masks it)
        *([structlog.processors.format_exc_info] if _is_json(renderer) else []),
        redact_by_key,
        renderer,
        _redact,
    ]
    structlog.configure(
        processors=[*before, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*before, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def _is_json(renderer: structlog.typing.Processor) -> bool:
    return isinstance(renderer, structlog.processors.JSONRenderer)


def _renderer() -> structlog.typing.Processor:
    chosen = os.environ.get("TB_LOG_FORMAT", "").strip().lower()
    if chosen not in ("", "json", "console"):
        raise SystemExit(f"TB_LOG_FORMAT: must be json or console (got {chosen!r})")
    if chosen == "json" or (chosen != "console" and not sys.stderr.isatty()):
        return structlog.processors.JSONRenderer()
    # plain tracebacks: one screen per crash, and no local variables in the log
    return structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback
    )


_open_line = False  # a progress line without its newline is on the terminal


def announce(line: str) -> None:
    """Human-facing milestone lines (registration, connection) on stderr."""
    global _open_line
    if _open_line:
        sys.stderr.write("\n")  # below the progress bar, not glued to it
        _open_line = False
    print(_redact.text(line), file=sys.stderr, flush=True)


def progress_line(text: str) -> None:
    """Redraw the current line (a progress bar); the next ``announce`` starts a new one."""
    global _open_line
    sys.stderr.write(f"\r{_redact.text(text)}")
    sys.stderr.flush()
    _open_line = True


def end_progress_line() -> None:
    global _open_line
    if _open_line:
        sys.stderr.write("\n")
        sys.stderr.flush()
        _open_line = False
