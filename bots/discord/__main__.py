"""``threadbot discord`` / ``python -m bots.discord``: run the Discord bot on the gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

import aiohttp
import discord
from discord.gateway import DiscordWebSocket
from discord.http import INTERNAL_API_VERSION

from bots.discord.client import PLATFORM, DiscordBot
from bots.metrics_http import metrics_server
from core.config import Settings
from core.engine import ChatEngine
from core.errors import ConfigError
from core.logs import configure_logging, report_failure, show_tracebacks, startup_line

log = logging.getLogger("threadbot.discord")

PRIVILEGED_INTENT_HELP = (
    "Discord refused the Message Content intent (gateway close code 4014); enable it: "
    "https://discord.com/developers/applications -> your application -> Bot -> Privileged "
    "Gateway Intents -> turn on MESSAGE CONTENT INTENT -> Save Changes, then start the bot "
    "again. (Bots in 100 or more servers need Discord's approval for it.)"
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
PROG = "threadbot discord"
#: Discord's REST base when DISCORD_API_URL is not set (discord.py's own).
DISCORD_API_DEFAULT = "https://discord.com/api/v10"
#: Seconds the start-up look at the gateway may take (discord.py itself allows 60 per connect).
GATEWAY_CHECK_TIMEOUT_SECONDS = 30
#: What a failed connection raises: aiohttp's errors, the OS's, and timeouts.
UNREACHABLE = (aiohttp.ClientError, OSError, TimeoutError)


def point_discord_py_at(settings: Settings) -> None:
    """Send discord.py's REST calls to DISCORD_API_URL when set (the gateway follows at login)."""
    if settings.discord_api_url:
        discord.http.Route.BASE = settings.discord_api_url.rstrip("/")


@contextlib.contextmanager
def api_reachable(settings: Settings) -> Iterator[None]:
    """Turn "cannot reach the REST API" at login into a ConfigError naming DISCORD_API_URL."""
    try:
        yield
    except (*UNREACHABLE, discord.GatewayNotFound) as error:
        url = settings.discord_api_url or DISCORD_API_DEFAULT
        raise ConfigError(
            f"cannot reach Discord's API at {url} ({_reason(error)}); check the network, or "
            f"DISCORD_API_URL if you set it (default {DISCORD_API_DEFAULT}), then start again",
            setting="DISCORD_API_URL",
        ) from error


async def check_gateway(client: DiscordBot, settings: Settings) -> str:
    """Open and close one websocket to the gateway discord.py will use; return its URL.

    discord.py's first connection, when it fails, logs a traceback, then fails again on its own
    missing websocket; a look beforehand turns an unreachable gateway into one line.
    """
    gateway = DiscordWebSocket.DEFAULT_GATEWAY
    try:
        async with asyncio.timeout(GATEWAY_CHECK_TIMEOUT_SECONDS):
            socket = await client.http.ws_connect(
                str(gateway.with_query(v=INTERNAL_API_VERSION, encoding="json"))
            )
            await socket.close()
    except UNREACHABLE as error:
        if settings.discord_gateway_url:
            advice = "check DISCORD_GATEWAY_URL"
        elif settings.discord_api_url:
            advice = "DISCORD_API_URL's GET /gateway/bot named it; set DISCORD_GATEWAY_URL"
        else:
            advice = "check the network (or set DISCORD_GATEWAY_URL)"
        raise ConfigError(
            f"cannot reach Discord's gateway at {gateway} ({_reason(error)}); {advice}, then "
            "start again",
            setting="DISCORD_GATEWAY_URL",
        ) from error
    return str(gateway)


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


async def serve(client: DiscordBot, settings: Settings, label: str) -> None:
    """Log in (REST), check the gateway, say what runs, then stay connected."""
    assert settings.discord_bot_token is not None
    with api_reachable(settings):
        await client.login(settings.discord_bot_token)
    gateway = await check_gateway(client, settings)
    running = f"Discord bot {client.user} connecting to the gateway at {gateway}"
    log.info(startup_line(running, model=label, settings=settings))
    await client.connect()


async def run(settings: Settings, *, engine: ChatEngine | None = None) -> None:
    """Connect and serve until the gateway closes or SIGINT/SIGTERM; raise on refusal."""
    if not settings.discord_bot_token:
        raise ConfigError(MISSING_TOKEN_HELP, setting="DISCORD_BOT_TOKEN")
    point_discord_py_at(settings)
    engine = engine or await ChatEngine.create(settings)
    try:
        engine.store.hold_platform(PLATFORM)
    except ConfigError:
        await engine.close()
        raise
    # Flushed: under a process manager stdout is a pipe, and the invite URL is wanted now.
    client = DiscordBot(settings, engine, announce=functools.partial(print, flush=True))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with client, metrics_server(settings, engine.metrics):
            runner = asyncio.create_task(serve(client, settings, engine.provider.label))
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
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the Discord bot on the gateway. Configuration comes from the "
        "environment and .env (see README).",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show tracebacks of start-up failures"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        settings = Settings.load()
    except ConfigError as error:
        report_failure(PROG, error, with_traceback=args.verbose)
        return EXIT_CONFIG
    configure_logging(settings, verbose=args.verbose)
    tracebacks = show_tracebacks(settings, verbose=args.verbose)
    try:
        asyncio.run(run(settings))
    except (ConfigError, discord.PrivilegedIntentsRequired, discord.LoginFailure) as error:
        report_failure(PROG, _operator_error(error), with_traceback=tracebacks)
        return EXIT_CONFIG
    return 0


def _operator_error(error: Exception) -> ConfigError:
    """Discord's refusals as what the operator must change."""
    if isinstance(error, ConfigError):
        return error
    if isinstance(error, discord.PrivilegedIntentsRequired):
        translated = ConfigError(PRIVILEGED_INTENT_HELP)
    else:
        translated = ConfigError(BAD_TOKEN_HELP, setting="DISCORD_BOT_TOKEN")
    translated.__cause__ = error
    return translated


if __name__ == "__main__":
    sys.exit(main())
