"""The ``threadbot`` command: ``chat``, ``slack``, ``discord``, ``db upgrade``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from core.config import Settings
from core.errors import ConfigError


def _db_upgrade() -> int:
    from core.store import ConversationStore

    async def upgrade() -> None:
        settings = Settings.load()
        store = await ConversationStore.open(settings.database_url)
        await store.close()
        print(f"database is up to date: {settings.database_url.split('@')[-1]}")

    asyncio.run(upgrade())
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
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="apply migrations")
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "db":
        try:
            return _db_upgrade()
        except ConfigError as error:
            print(f"threadbot: {error}", file=sys.stderr)
            return 2
    module = {
        "chat": "bots.cli",
        "slack": "bots.slack.__main__",
        "discord": "bots.discord.__main__",
    }[args.command]
    entry = importlib.import_module(module).main
    result: int = entry(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
