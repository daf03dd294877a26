"""``GET /metrics`` (Prometheus text): on the Slack HTTP server's port, and on ``METRICS_PORT``
for any process that has no HTTP server of its own (Discord, Slack in Socket Mode)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from core.config import Settings
from core.errors import ConfigError
from core.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler that answers a scrape with ``metrics``' exposition."""

    async def handle(request: web.Request) -> web.Response:
        # aiohttp refuses a content type with parameters in ``content_type=``: set the header.
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return handle


def add_metrics_route(app: web.Application, metrics: Metrics) -> None:
    """Serve ``GET /metrics`` from ``app``."""
    app.router.add_get(METRICS_PATH, metrics_handler(metrics))


@contextlib.asynccontextmanager
async def metrics_server(
    settings: Settings, metrics: Metrics, *, host: str = "0.0.0.0"
) -> AsyncIterator[int | None]:
    """Serve ``GET /metrics`` on ``METRICS_PORT`` while the block runs (nothing when unset).

    Yields the port served, or None. A port that cannot be bound is a ConfigError naming it.
    """
    port = settings.metrics_port
    if port is None:
        yield None
        return
    app = web.Application()
    add_metrics_route(app, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as error:
            raise ConfigError(
                f"METRICS_PORT {port} cannot be served ({error.strerror or error}); choose a "
                "free port or unset METRICS_PORT",
                setting="METRICS_PORT",
            ) from error
        log.info("metrics on :%d%s", port, METRICS_PATH)
        yield port
    finally:
        await runner.cleanup()
