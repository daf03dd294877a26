"""Logging for every entry point: LOG_LEVEL on stderr, libraries' chatter hidden unless DEBUG.

``LOG_FORMAT=json`` writes one JSON object per line (``JsonFormatter``) for log collectors; a
turn's line carries its conversation, outcome and timings under ``turn``.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime

from core.config import Settings, hide_password

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers of threadbot itself; every other logger is a library's (Alembic's "setup plugin" and
#: "Context impl", Bolt's "`token` will be unused", discord.py's "PyNaCl is not installed").
OWN_LOGGERS = ("core", "bots", "threadbot", "migrations", "__main__")
#: Below this, a library's lines are start-up noise to an operator unless LOG_LEVEL=DEBUG.
LIBRARY_LEVEL = logging.ERROR


#: Structured fields a log call may pass in ``extra=`` that JSON lines carry as they are.
JSON_EXTRA_FIELDS = ("turn",)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, exception, and known extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in JSON_EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: an id or a path in ``extra`` must never cost the line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class LibraryNoise(logging.Filter):
    """Drop libraries' records below LIBRARY_LEVEL; threadbot's own pass at any level.

    A filter on the handler, not logger levels: Bolt copies the root level onto its own loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return own or record.levelno >= LIBRARY_LEVEL


def log_level(settings: Settings, *, verbose: bool = False, default: str = "INFO") -> int:
    """The level to log at: LOG_LEVEL when set, else INFO with ``verbose``, else ``default``."""
    name = settings.log_level or ("INFO" if verbose else default)
    return logging.getLevelNamesMapping()[name]


def configure_logging(settings: Settings, *, verbose: bool = False, default: str = "INFO") -> int:
    """Log to stderr at ``log_level(...)``; libraries only say errors unless the level is DEBUG.

    The terminal chat passes ``default="CRITICAL"`` so that it stays quiet unless asked.
    Returns the level chosen.
    """
    level = log_level(settings, verbose=verbose, default=default)
    handler = logging.StreamHandler(sys.stderr)
    json_lines = settings.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(LOG_FORMAT))
    debugging = level <= logging.DEBUG
    if not debugging:
        handler.addFilter(LibraryNoise())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Libraries' Python warnings go through logging ("py.warnings"), so the filter hides them.
    logging.captureWarnings(True)
    return level


def show_tracebacks(settings: Settings, *, verbose: bool = False) -> bool:
    """Whether a start-up failure should print its traceback too (``-v`` or LOG_LEVEL=DEBUG)."""
    return verbose or settings.log_level == "DEBUG"


def startup_line(running: str, *, model: str, settings: Settings) -> str:
    """The one start-up line: what runs and where, the model, the database (password hidden)."""
    return f"{running}; model {model}; database {hide_password(settings.database_url)}"


def report_failure(prog: str, error: BaseException, *, with_traceback: bool) -> None:
    """Say why start-up failed in one line on stderr (after the traceback when asked for)."""
    if with_traceback:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prog}: {error}", file=sys.stderr)
