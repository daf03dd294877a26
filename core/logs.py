"""Logging for every entry point: LOG_LEVEL on stderr, libraries' chatter hidden unless DEBUG."""

from __future__ import annotations

import logging
import warnings

from core.config import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries whose INFO and WARNING lines are start-up noise to an operator (Alembic's "setup
#: plugin" and "Context impl", Bolt's "`token` will be unused", discord.py's "PyNaCl is not
#: installed"); their errors still show.
LIBRARY_LOGGERS = (
    "alembic",
    "slack_bolt",
    "slack_sdk",
    "discord",
    "aiohttp",
    "asyncio",
    "sqlalchemy",
    "httpx",
    "openai",
    "anthropic",
)
LIBRARY_LEVEL = logging.ERROR


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
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    debugging = level <= logging.DEBUG
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debugging else LIBRARY_LEVEL)
    if not debugging:
        # Deprecation and resource warnings from libraries are for their maintainers.
        warnings.simplefilter("ignore")
    logging.captureWarnings(True)
    return level


def show_tracebacks(settings: Settings, *, verbose: bool = False) -> bool:
    """Whether a start-up failure should print its traceback too (``-v`` or LOG_LEVEL=DEBUG)."""
    return verbose or settings.log_level == "DEBUG"
