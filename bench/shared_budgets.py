"""Two processes streaming into one Slack workspace: in-process budgets vs shared ones.

Two real subprocesses (standing for two Slack HTTP workers behind a load balancer) each stream
10 replies at once; every reply makes its ``chat.update`` calls through ``Budgets`` built by
``budgets_for`` (in-process only, PostgreSQL, or Redis), against a local counter that enforces
the workspace's Tier 3 limit like tests/wire/slack does (a token bucket at 50/min holding the
bot's burst plus a little network slack) and answers 429 with Retry-After. A 429 pauses the
scope (``budgets.pause``) and the call is retried, as the streamer does. Slack's minute is
scaled (``--scale``) so a run takes about 10 s. Prints, per mode: calls accepted, 429s (calls
over the limit), the busiest platform window, wall time and each process's share.

    .venv/bin/python bench/shared_budgets.py [--scale 20] [--replies 10] [--calls 8]
        [--modes local,postgres,redis] [--database-url postgresql+asyncpg://...]
        [--redis-url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import web

from bots.slack.surface import CHAT_UPDATE_PER_SECOND, EDIT_BURST
from core.config import Settings
from core.limiters import budgets_for
from core.ratelimit import RateScope
from core.store import ConversationStore
from tests.wire.slack.server import NETWORK_SLACK_CALLS, TokenBucket

PROCESSES = 2
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Seconds the children get to import and connect before both start at once.
START_DELAY = 3.0


# -- the platform ------------------------------------------------------------------------------


class Counter:
    """Slack's chat.update limit for one workspace: accepts or answers 429, records both."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.bucket = TokenBucket(
            CHAT_UPDATE_PER_SECOND * scale, EDIT_BURST + NETWORK_SLACK_CALLS, time.monotonic
        )
        self.accepted: list[tuple[float, str]] = []
        self.limited = 0

    async def handle(self, request: web.Request) -> web.Response:
        wait = self.bucket.wait()
        if wait:
            self.limited += 1
            # Slack says whole seconds; in the scaled minute that is whole seconds / scale.
            retry_after = math.ceil(wait * self.scale) / self.scale
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": f"{retry_after:.3f}"},
            )
        self.bucket.take()
        self.accepted.append((time.monotonic(), request.query.get("process", "?")))
        return web.json_response({"ok": True})

    def busiest_window(self, window: float) -> int:
        times = sorted(t for t, _ in self.accepted)
        return max(
            (sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)),
            default=0,
        )


# -- one worker process ------------------------------------------------------------------------


async def child(args: argparse.Namespace) -> None:
    env = {"DATABASE_URL": args.database_url or "sqlite+aiosqlite:///:memory:"}
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    settings = Settings.from_mapping(env)
    store = (
        await ConversationStore.open(args.database_url, migrate=False)
        if args.database_url
        else None
    )
    budgets = budgets_for(settings, store)
    scope = RateScope(args.key, CHAT_UPDATE_PER_SECOND * args.scale, EDIT_BURST)
    limited = 0
    async with aiohttp.ClientSession() as session:

        async def reply() -> None:
            nonlocal limited
            for _ in range(args.calls):
                while True:
                    await budgets.acquire([scope])
                    async with session.post(
                        args.platform, params={"process": args.name}
                    ) as response:
                        if response.status != 429:
                            break
                        limited += 1
                        budgets.pause(scope.key, float(response.headers["Retry-After"]))

        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        await asyncio.gather(*(reply() for _ in range(args.replies)))
    await budgets.aclose()
    if store is not None:
        await store.close()
    print(json.dumps({"name": args.name, "limited": limited}))


# -- the run -----------------------------------------------------------------------------------


async def scratch_database(admin_url: str) -> tuple[str, Any]:
    """A fresh database next to ``admin_url`` with the schema, and a coroutine to drop it."""
    import asyncpg

    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://")
    name = f"threadbot_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    store = await ConversationStore.open(url)
    await store.close()

    async def drop() -> None:
        conn = await asyncpg.connect(dsn)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    return url, drop


async def run_mode(mode: str, args: argparse.Namespace) -> None:
    counter = Counter(args.scale)
    app = web.Application()
    app.router.add_post("/api/chat.update", counter.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    drop = None
    extra: list[str] = []
    try:
        if mode == "postgres":
            url, drop = await scratch_database(args.database_url)
            extra = ["--database-url", url]
        elif mode == "redis":
            extra = ["--redis-url", args.redis_url]
        start_at = time.time() + START_DELAY
        key = f"slack:TBENCH{uuid.uuid4().hex[:6]}:chat.update"
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                f"p{n}",
                "--platform",
                f"http://127.0.0.1:{port}/api/chat.update",
                "--key",
                key,
                "--start-at",
                repr(start_at),
                "--scale",
                repr(args.scale),
                "--replies",
                str(args.replies),
                "--calls",
                str(args.calls),
                *extra,
                stdout=subprocess.PIPE,
            )
            for n in range(PROCESSES)
        ]
        outputs = [await c.communicate() for c in children]
        if any(c.returncode for c in children):
            raise RuntimeError(f"{mode}: a worker failed")
        reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    finally:
        await runner.cleanup()
        if drop is not None:
            await drop()
    times = [t for t, _ in counter.accepted]
    window = 60 / args.scale
    limit = 50 + EDIT_BURST + NETWORK_SLACK_CALLS
    shares = "/".join(
        str(sum(1 for _, who in counter.accepted if who == r["name"])) for r in reports
    )
    print(
        f"{mode:>9}  calls {len(counter.accepted):>4}  429s (over the limit) {counter.limited:>4}  "
        f"busiest Slack minute {counter.busiest_window(window):>3} (limit ~{limit})  "
        f"wall {max(times) - min(times):5.1f} s  per process {shares}"
    )


async def reachable(mode: str, args: argparse.Namespace) -> str | None:
    """Why ``mode`` cannot run here, or None."""
    try:
        if mode == "postgres":
            import asyncpg

            dsn = args.database_url.replace("postgresql+asyncpg://", "postgresql://")
            conn = await asyncio.wait_for(asyncpg.connect(dsn), timeout=3)
            await conn.close()
        elif mode == "redis":
            from redis.asyncio import Redis

            client = Redis.from_url(args.redis_url, socket_connect_timeout=3)
            try:
                await client.ping()
            finally:
                await client.aclose()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


async def main(args: argparse.Namespace) -> None:
    rate = CHAT_UPDATE_PER_SECOND * 60
    total = PROCESSES * args.replies * args.calls
    print(
        f"{PROCESSES} processes x {args.replies} replies x {args.calls} chat.update calls = "
        f"{total} calls into one workspace; Slack allows {rate:.0f}/min (burst "
        f"{EDIT_BURST}+{NETWORK_SLACK_CALLS}), run {args.scale:g}x faster "
        f"(a Slack minute = {60 / args.scale:.1f} s)"
    )
    for mode in args.modes.split(","):
        problem = await reachable(mode, args)
        if problem is not None:
            print(f"{mode:>9}  skipped: not reachable ({problem})")
            continue
        await run_mode(mode, args)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--calls", type=int, default=8, help="chat.update calls per reply")
    parser.add_argument("--modes", default="local,postgres,redis")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None)
    # Worker processes only.
    parser.add_argument("--child", dest="name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--platform", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(sys.argv[1:])
    if options.name is not None:
        asyncio.run(child(options))
    else:
        options.database_url = options.database_url or DEFAULT_PG_URL
        options.redis_url = options.redis_url or DEFAULT_REDIS_URL
        asyncio.run(main(options))
