"""``threadbot slack`` (also ``python -m bots.slack``): run the Slack bot.

HTTP mode serves ``POST /slack/events``, ``GET /healthz`` and ``GET /metrics`` on ``PORT``; with
``SLACK_APP_TOKEN`` set the bot connects over Socket Mode instead and serves only ``/healthz``
and ``/metrics`` there. ``METRICS_PORT`` (when set and not ``PORT``) serves ``/metrics`` too.
SIGTERM / SIGINT end every reply in progress with a note, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import web
from slack_sdk.errors import SlackApiError, SlackRequestError

from bots.metrics_http import metrics_server
from bots.slack.app import EVENTS_PATH, HEALTH_PATH, PLATFORM, SlackBot, check_settings
from bots.slack.surface import translate
from core.config import Settings
from core.engine import ChatEngine
from core.errors import ConfigError, PermanentSurfaceError
from core.logs import configure_logging, report_failure, show_tracebacks, startup_line

log = logging.getLogger("bots.slack")

#: Seconds each Web API call may take before it counts as a transient failure.
SLACK_API_TIMEOUT_SECONDS = 15
PROG = "threadbot slack"
#: Exit status when an operator must fix a setting (or the network).
EXIT_CONFIG = 2


@contextlib.contextmanager
def slack_reachable(settings: Settings) -> Iterator[None]:
    """Turn "cannot reach the Web API" at start-up into a ConfigError naming SLACK_API_URL."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError, SlackRequestError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(
            f"cannot reach the Slack Web API at {settings.slack_api_url} ({reason}); check the "
            "network, or SLACK_API_URL if you set it (default https://slack.com/api/), then "
            "start again",
            setting="SLACK_API_URL",
        ) from error


async def serve(settings: Settings, stop: asyncio.Event, *, host: str = "0.0.0.0") -> None:
    """Run until ``stop`` is set: open the engine, serve HTTP (and Socket Mode), shut down."""
    # Missing Slack settings are reported before the database is opened and migrated.
    check_settings(settings, socket_mode=bool(settings.slack_app_token))
    engine = await ChatEngine.create(settings)
    try:
        engine.store.hold_platform(PLATFORM)
    except ConfigError:
        await engine.close()
        raise
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SLACK_API_TIMEOUT_SECONDS))
    runner: web.AppRunner | None = None
    stack = contextlib.AsyncExitStack()
    # Bolt's Socket Mode handler (untyped); only set in Socket Mode.
    handler: Any = None
    label = engine.provider.label
    try:
        bot = SlackBot(settings, engine)
        # One connection pool for every Web API call (slack_sdk opens one per call otherwise).
        bot.client.session = session
        # In Socket Mode requests arrive over the websocket; only the health check is served.
        app = bot.web_app(events=not bot.socket_mode)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, settings.port).start()
        if settings.metrics_port not in (None, settings.port):
            # /metrics is on PORT already; METRICS_PORT serves it too when it differs.
            await stack.enter_async_context(metrics_server(settings, engine.metrics, host=host))
        with slack_reachable(settings):
            await bot.start()
        if bot.socket_mode:
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            handler = AsyncSocketModeHandler(bot.app, settings.slack_app_token)
            if await connect_socket_mode(handler, stop):
                running = (
                    f"Slack bot <@{bot.bot_user_id}> in {bot.team_id} connected over Socket Mode, "
                    f"health check on :{settings.port}{HEALTH_PATH}"
                )
                log.info(startup_line(running, model=label, settings=settings))
        else:
            running = (
                f"Slack bot <@{bot.bot_user_id}> in {bot.team_id}, HTTP mode, listening on "
                f":{settings.port} (POST {EVENTS_PATH}, GET {HEALTH_PATH})"
            )
            log.info(startup_line(running, model=label, settings=settings))
        await stop.wait()
        log.info("shutting down: ending replies in progress")
        if handler is not None:
            # Take no more envelopes before ending replies: Slack redelivers the ones we never
            # acked, where acking one now would start a turn only to cut it off.
            await handler.close_async()
            handler = None
        await bot.close()
    finally:
        if handler is not None:
            await handler.close_async()
        if runner is not None:
            await runner.cleanup()
        await stack.aclose()
        await engine.close()
        await session.close()


async def connect_socket_mode(handler: Any, stop: asyncio.Event) -> bool:
    """Open Bolt's Socket Mode connection; False if ``stop`` was set before it opened.

    The first websocket URL is asked here so that a refused SLACK_APP_TOKEN (a bot token pasted
    there, a revoked one) is a ConfigError naming it, as a refused bot token is; slack_sdk alone
    would log the refusal and ask again every 10 seconds forever. While Slack cannot be reached,
    slack_sdk keeps retrying, and ``stop`` (SIGTERM) still ends the wait.
    """
    client = handler.client
    try:
        client.wss_uri = await client.issue_new_wss_url()
    except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
        refusal = translate(error, method="apps.connections.open", scope=None)
        if isinstance(refusal, PermanentSurfaceError):
            raise ConfigError(
                f"Slack refused SLACK_APP_TOKEN ({refusal.code}); generate an app-level token "
                "(xapp-...) with the connections:write scope on your Slack app's Basic "
                "Information page",
                setting="SLACK_APP_TOKEN",
            ) from error
        # Unreachable or busy: slack_sdk's connect loop asks again.
    connecting = asyncio.ensure_future(handler.connect_async())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    if connecting.cancelled():
        return False
    connecting.result()
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``threadbot slack``; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="threadbot slack",
        description="Run the Slack bot: HTTP mode on PORT, or Socket Mode when SLACK_APP_TOKEN "
        "is set. Configuration comes from the environment and .env (see README).",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show tracebacks of start-up failures"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.load()
    except ConfigError as error:
        report_failure(PROG, error, with_traceback=args.verbose)
        return EXIT_CONFIG
    configure_logging(settings, verbose=args.verbose)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop, host=args.host)

    try:
        asyncio.run(run())
    except ConfigError as error:
        report_failure(PROG, error, with_traceback=show_tracebacks(settings, verbose=args.verbose))
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
