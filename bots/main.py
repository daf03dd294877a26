"""The ``threadbot`` command: ``chat``, ``slack``, ``discord``, ``db upgrade``, ``usage``,
``experiment``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from core.config import Settings, hide_password
from core.errors import ConfigError
from core.logs import configure_logging, report_failure, show_tracebacks

#: Exit status when an operator must fix a setting.
EXIT_CONFIG = 2


def _db_upgrade(*, verbose: bool) -> int:
    """``threadbot db upgrade``: apply the migrations to DATABASE_URL."""
    from core.store import ConversationStore

    try:
        settings = Settings.load()
    except ConfigError as error:
        report_failure("threadbot db", error, with_traceback=verbose)
        return EXIT_CONFIG
    configure_logging(settings, verbose=verbose)

    async def upgrade() -> None:
        store = await ConversationStore.open(settings.database_url)
        await store.close()

    try:
        asyncio.run(upgrade())
    except ConfigError as error:
        tracebacks = show_tracebacks(settings, verbose=verbose)
        report_failure("threadbot db", error, with_traceback=tracebacks)
        return EXIT_CONFIG
    print(f"database is up to date: {hide_password(settings.database_url)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="threadbot",
        description="An LLM chat bot for Slack, Discord and the terminal.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("chat", help="chat in the terminal", add_help=False)
    sub.add_parser(
        "slack",
        help="run the Slack bot (HTTP mode, or Socket Mode with SLACK_APP_TOKEN)",
        add_help=False,
    )
    sub.add_parser("discord", help="run the Discord bot", add_help=False)
    sub.add_parser(
        "usage", help="turns, tokens and cost per day, user, channel or model", add_help=False
    )
    sub.add_parser(
        "experiment",
        help="compare system prompts: start, list, report, stop (and ship)",
        add_help=False,
    )
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="apply migrations")
    db.add_argument("--verbose", "-v", action="store_true", help="show the traceback of a failure")
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "db":
        return _db_upgrade(verbose=args.verbose)
    module = {
        "chat": "bots.cli",
        "slack": "bots.slack.__main__",
        "discord": "bots.discord.__main__",
        "usage": "bots.usage",
        "experiment": "bots.experiments",
    }[args.command]
    entry = importlib.import_module(module).main
    result: int = entry(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
