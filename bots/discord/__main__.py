"""``threadbot discord`` / ``python -m bots.discord``: run the Discord bot on the gateway."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Sequence

import discord

from bots.discord.client import DiscordBot
from core.config import Settings
from core.engine import ChatEngine
from core.errors import ConfigError

log = logging.getLogger("threadbot.discord")

PRIVILEGED_INTENT_HELP = (
    "Discord refused the Message Content intent (gateway close code 4014).\n"
    "Enable it: https://discord.com/developers/applications -> your application -> Bot -> "
    "Privileged Gateway Intents -> turn on MESSAGE CONTENT INTENT -> Save Changes, then start "
    "the bot again. (Bots in 100 or more servers need Discord's approval for it.)"
)
BAD_TOKEN_HELP = (
    "Discord refused DISCORD_BOT_TOKEN. Copy a fresh token from the developer portal "
    "(your application -> Bot -> Reset Token) into DISCORD_BOT_TOKEN."
)
MISSING_TOKEN_HELP = (
    "DISCORD_BOT_TOKEN is not set. Create an application at "
    "https://discord.com/developers/applications, open Bot, press Reset Token and put the token "
    "in DISCORD_BOT_TOKEN (environment or .env)."
)
#: Exit status when an operator must fix a setting or the developer portal.
EXIT_CONFIG = 2


def point_discord_py_at(settings: Settings) -> None:
    """Send discord.py's REST calls to DISCORD_API_URL when set (the gateway follows at login)."""
    if settings.discord_api_url:
        discord.http.Route.BASE = settings.discord_api_url.rstrip("/")


async def run(settings: Settings, *, engine: ChatEngine | None = None) -> None:
    """Connect and serve until the gateway closes or SIGINT/SIGTERM; raise on refusal."""
    if not settings.discord_bot_token:
        raise ConfigError(MISSING_TOKEN_HELP, setting="DISCORD_BOT_TOKEN")
    point_discord_py_at(settings)
    engine = engine or await ChatEngine.create(settings)
    log.info("language model: %s", engine.provider.label)
    # Flushed: under a process manager stdout is a pipe, and the invite URL is wanted now.
    client = DiscordBot(settings, engine, announce=functools.partial(print, flush=True))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with client:
            runner = asyncio.create_task(client.start(settings.discord_bot_token))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not runner.done():
                await client.close()
            await runner
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    del argv  # no options: everything comes from the environment
    try:
        settings = Settings.load()
    except ConfigError as error:
        print(f"threadbot: {error}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run(settings))
    except ConfigError as error:
        print(f"threadbot: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except discord.PrivilegedIntentsRequired:
        print(f"threadbot: {PRIVILEGED_INTENT_HELP}", file=sys.stderr)
        return EXIT_CONFIG
    except discord.LoginFailure:
        print(f"threadbot: {BAD_TOKEN_HELP}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
