"""A local imitation of Discord's REST API (v10) and gateway, spoken to by the real discord.py.

One aiohttp server on 127.0.0.1 serves both:

- REST under ``/api/v10`` (``DISCORD_API_URL``): users/@me, oauth2/applications/@me, gateway/bot,
  channel messages (POST, PATCH, GET), threads started from a message (second start answers code
  160004), typing, application commands (global and guild; GET and PUT bulk overwrite),
  interaction callbacks (recorded with when they came, ``acknowledged_after``), the original
  interaction response (PATCH, DELETE) and followups. Attachments are hosted like Discord's CDN
  (``add_attachment``; downloads counted). Every message's successive contents are recorded. Per-channel buckets answer real 429s (JSON ``retry_after``,
  ``X-RateLimit-*`` headers and the ``Via: 1.1 google`` header discord.py checks for), as does the
  50 requests per second bot-wide cap. ``answer_next`` makes a message post or edit answer any
  status with a body that is not Discord's JSON (a proxy's HTML or plain-text page, or nothing).
- The gateway over a websocket at ``/gateway``: HELLO, IDENTIFY -> READY (with ``session_id`` and
  ``resume_gateway_url``) then GUILD_CREATE, heartbeat ACKs, dispatch on demand
  (``dispatch``/``send_message``/``send_interaction``; button clicks ``click``, modal submits
  ``submit_modal``, message context-menu commands ``context_menu`` and autocomplete
  ``autocomplete`` with its ``choices``), RECONNECT followed by RESUME with replay of
  the missed events (``force_reconnect``), and close code 4014 for refused privileged intents.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
BOT_TOKEN = "test-token"
DISCORD_EPOCH_MS = 1_420_070_400_000
# Discord's published numbers the fake enforces by default ("Rate Limits" docs and observed
# headers): 5 message posts and 5 edits per 5 s per channel, 50 requests per second per bot.
CHANNEL_POST_LIMIT = 5
CHANNEL_EDIT_LIMIT = 5
CHANNEL_WINDOW_SECONDS = 5.0
BOT_LIMIT_PER_SECOND = 50
MESSAGE_CONTENT_INTENT = 1 << 15
THREAD_ALREADY_CREATED = 160004
MISSING_PERMISSIONS = 50013
UNKNOWN_CHANNEL = 10003
UNKNOWN_MESSAGE = 10008

# Discord channel types.
GUILD_TEXT = 0
DM = 1
GUILD_FORUM = 15
PUBLIC_THREAD = 11

Json = dict[str, Any]


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses a body only when Content-Type is exactly "application/json", as Discord
    # sends it (aiohttp's json_response would add "; charset=utf-8").
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), UTC).isoformat()


@dataclass
class FakeMessage:
    """One message as the fake holds it, with every content it has had (first = as posted)."""

    id: int
    channel_id: int
    author: Json
    states: list[str]
    reference: int | None = None
    payloads: list[Json] = field(default_factory=list)
    #: When each state arrived (the fake's clock), parallel to ``states``.
    times: list[float] = field(default_factory=list)
    #: The message's components now (buttons), as the last post or edit that set them.
    components: list[Json] = field(default_factory=list)
    #: The files a person attached to the message (Discord's attachment objects).
    attachments: list[Json] = field(default_factory=list)

    def custom_ids(self) -> list[str]:
        """The custom ids of the message's buttons, in order."""
        return [
            str(item.get("custom_id"))
            for row in self.components
            for item in row.get("components") or ()
        ]

    @property
    def content(self) -> str:
        return self.states[-1]


@dataclass
class Bucket:
    """A fixed-window bucket as Discord describes its per-route limits."""

    name: str
    limit: int
    window: float
    remaining: int = 0
    reset_at: float = 0.0

    def take(self, now: float) -> float | None:
        """Consume one request; return None when allowed, else the seconds until the reset."""
        if now >= self.reset_at:
            self.remaining = self.limit
            self.reset_at = now + self.window
        if self.remaining <= 0:
            return self.reset_at - now
        self.remaining -= 1
        return None


@dataclass
class Session:
    """A gateway session: its event log (for RESUME) and the socket currently attached."""

    id: str
    intents: int
    ws: web.WebSocketResponse | None = None
    seq: int = 0
    events: list[tuple[int, str, Json]] = field(default_factory=list)


class FakeDiscord:
    """Discord, as far as a bot can tell, on 127.0.0.1. Start with ``await fake.start()``."""

    def __init__(
        self,
        *,
        post_limit: int = CHANNEL_POST_LIMIT,
        edit_limit: int = CHANNEL_EDIT_LIMIT,
        window: float = CHANNEL_WINDOW_SECONDS,
        bot_limit: int = BOT_LIMIT_PER_SECOND,
        refuse_intents: int = 0,
        send_via_header: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.post_limit = post_limit
        self.edit_limit = edit_limit
        self.window = window
        self.bot_limit = bot_limit
        self.refuse_intents = refuse_intents
        self.send_via_header = send_via_header
        self.clock = clock
        self._ids = itertools.count(1)
        self._epoch_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS

        self.bot = self.make_user("threadbot", bot=True)
        self.app_id = self.snowflake()
        self.guild_id = self.snowflake()
        self.owner = self.make_user("owner")
        #: The @everyone role's permissions (the guild's owner has every permission anyway).
        self.everyone_permissions = (1 << 41) - 1
        self.channels: dict[int, Json] = {}
        self.messages: dict[int, FakeMessage] = {}
        self.attachments: dict[str, bytes] = {}
        self.no_thread_permission: set[int] = set()
        self.global_commands: list[Json] = []
        self.guild_commands: dict[int, list[Json]] = defaultdict(list)
        #: Every interaction callback (the interaction's response), with ``at``: when it came.
        self.callbacks: list[Json] = []
        #: When each interaction was dispatched, by token (the fake's clock).
        self.interaction_times: dict[str, float] = {}
        self.original_edits: dict[str, list[str]] = defaultdict(list)
        self.originals_deleted: set[str] = set()
        self.followups: dict[str, list[str]] = defaultdict(list)
        #: The followups' bodies as sent (their ``flags`` say whether they were ephemeral).
        self.followup_bodies: dict[str, list[Json]] = defaultdict(list)
        #: Downloads of hosted attachments, by path.
        self.downloads: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.thread_starts: Counter[int] = Counter()
        self.typing: Counter[int] = Counter()
        self.identifies = 0
        #: IDENTIFYs answered with READY and GUILD_CREATE, both written to the socket: from then
        #: on a dispatched event reaches a bot that knows the guild and its channels.
        self.greeted = 0
        self.resumes = 0
        self.sessions: dict[str, Session] = {}
        self.session: Session | None = None
        self._buckets: dict[str, Bucket] = {}
        self._forced_429: Counter[str] = Counter()
        #: Answers that are not Discord's JSON, per request name ("POST message", "PATCH message"):
        #: what a proxy in front of Discord sends (an HTML error page, plain text, nothing).
        self.raw_answers: dict[str, deque[tuple[int, str, str | None]]] = defaultdict(deque)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._interaction_channels: dict[str, int] = {}
        self._replay_extra = 0
        self.port = 0
        self.text_channel = self.add_text_channel("general")
        #: The role Discord makes for a bot when it joins (managed, tagged with the bot's id):
        #: the composer offers it next to the bot user, so people mention it too.
        self.bot_role_id = self.snowflake()

    # ---- world -------------------------------------------------------------------------------

    def snowflake(self) -> int:
        return (self._epoch_ms << 22) | next(self._ids)

    def make_user(self, name: str, *, bot: bool = False) -> Json:
        return {
            "id": str(self.snowflake()),
            "username": name,
            "discriminator": "0",
            "global_name": name,
            "avatar": None,
            "bot": bot,
        }

    def add_text_channel(self, name: str) -> int:
        cid = self.snowflake()
        self.channels[cid] = {
            "id": str(cid),
            "type": GUILD_TEXT,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": [],
            "parent_id": None,
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
        }
        return cid

    def add_forum(self, name: str) -> int:
        cid = self.add_text_channel(name)
        self.channels[cid].update(type=GUILD_FORUM, available_tags=[], default_reaction_emoji=None)
        return cid

    def add_thread(self, parent_id: int, name: str, *, thread_id: int | None = None) -> int:
        """A public thread that exists before the bot connects (or, later, announce it)."""
        tid = thread_id or self.snowflake()
        self.channels[tid] = self._thread_payload(tid, parent_id, name, self.owner["id"])
        return tid

    def add_dm(self) -> int:
        cid = self.snowflake()
        self.channels[cid] = {"id": str(cid), "type": DM, "last_message_id": None, "recipients": []}
        return cid

    def _thread_payload(self, tid: int, parent_id: int, name: str, owner_id: str) -> Json:
        return {
            "id": str(tid),
            "type": PUBLIC_THREAD,
            "guild_id": str(self.guild_id),
            "parent_id": str(parent_id),
            "owner_id": owner_id,
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _iso(),
                "locked": False,
            },
        }

    def add_attachment(self, filename: str, data: bytes, content_type: str) -> Json:
        """Host a file the way Discord's CDN would and return its attachment object."""
        aid = self.snowflake()
        path = f"/attachments/{aid}/{filename}"
        self.attachments[path] = data
        url = f"http://127.0.0.1:{self.port}{path}"
        return {
            "id": str(aid),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }

    # ---- records -----------------------------------------------------------------------------

    def messages_in(self, channel_id: int) -> list[FakeMessage]:
        return [m for m in self.messages.values() if m.channel_id == channel_id]

    def bot_messages_in(self, channel_id: int) -> list[FakeMessage]:
        return [m for m in self.messages_in(channel_id) if m.author["id"] == self.bot["id"]]

    @property
    def edits(self) -> int:
        return self.requests["PATCH message"]

    @property
    def total_429s(self) -> int:
        return sum(self.rate_limited.values())

    def force_429(self, bucket: str, channel_id: int, count: int) -> None:
        """Answer the next ``count`` requests of a channel's ``post``/``edit`` bucket with 429."""
        self._forced_429[f"{bucket}:{channel_id}"] += count

    def answer_next(
        self,
        request: str,
        status: int,
        body: str = "",
        *,
        content_type: str | None = "text/plain",
        times: int = 1,
    ) -> None:
        """Make the next ``times`` requests named ``request`` ("POST message", "PATCH message")
        answer ``status`` with ``body`` (``content_type`` None: no Content-Type header)."""
        self.raw_answers[request].extend([(status, body, content_type)] * times)

    def _raw_answer(self, request: str) -> web.Response | None:
        queued = self.raw_answers.get(request)
        if not queued:
            return None
        status, body, content_type = queued.popleft()
        self.requests[f"{request} {status}"] += 1
        if content_type is None:
            return web.Response(status=status, body=body.encode())
        return web.Response(status=status, text=body, content_type=content_type)

    def _touch(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], give_up_after: float = 15.0) -> None:
        """Wait until ``predicate()`` holds; the timeout only stops a broken test from hanging."""
        async with asyncio.timeout(give_up_after):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{name}", self._attachment)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- rate limits -------------------------------------------------------------------------

    def _limit(self, bucket: str, channel_id: int) -> web.Response | None:
        """A 429 response when the bot-wide or the channel's bucket is empty, else None."""
        now = self.clock()
        glob = self._buckets.setdefault("bot", Bucket("bot", self.bot_limit, 1.0))
        wait = glob.take(now)
        if wait is not None:
            return self._too_many("bot", glob, wait, is_global=True)
        key = f"{bucket}:{channel_id}"
        limit = self.post_limit if bucket == "post" else self.edit_limit
        b = self._buckets.setdefault(key, Bucket(key, limit, self.window))
        if self._forced_429[key] > 0:
            self._forced_429[key] -= 1
            return self._too_many(key, b, max(0.05, b.reset_at - now), forced=True)
        wait = b.take(now)
        if wait is not None:
            return self._too_many(key, b, wait)
        return None

    def _headers(self, b: Bucket) -> dict[str, str]:
        reset_after = max(0.0, b.reset_at - self.clock())
        return {
            "X-RateLimit-Limit": str(b.limit),
            "X-RateLimit-Remaining": str(max(0, b.remaining)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": b.name.split(":")[0] + "-bucket",
        }

    def _too_many(
        self, key: str, b: Bucket, wait: float, *, is_global: bool = False, forced: bool = False
    ) -> web.Response:
        self.rate_limited[key.split(":")[0]] += 1
        self._touch()
        headers = self._headers(b)
        headers["X-RateLimit-Remaining"] = "0"
        headers["Retry-After"] = f"{wait:.3f}"
        headers["X-RateLimit-Scope"] = "shared" if forced else ("global" if is_global else "user")
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        if self.send_via_header:
            # discord.py treats a 429 without Via as a Cloudflare ban and raises at once.
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": wait, "global": is_global}
        return _json(body, status=429, headers=headers)

    def _ok(self, data: Any, bucket_key: str | None = None, status: int = 200) -> web.Response:
        headers = self._headers(self._buckets[bucket_key]) if bucket_key else {}
        if data is None:
            return web.Response(status=204, headers=headers)
        return _json(data, status=status, headers=headers)

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        return _json({"code": code, "message": message}, status=status)

    # ---- REST --------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        parts = request.match_info["tail"].strip("/").split("/")
        # Interaction callbacks and webhooks authenticate with their token in the path instead.
        token_in_path = parts[0] in ("interactions", "webhooks")
        if not token_in_path and request.headers.get("Authorization") != f"Bot {BOT_TOKEN}":
            return self._error(401, 0, "401: Unauthorized")
        method = request.method
        body: Json = {}
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else {}
        try:
            return await self._route(method, parts, body, request)
        finally:
            self._touch()

    async def _route(
        self, method: str, parts: list[str], body: Json, request: web.Request
    ) -> web.Response:
        p = parts
        if p == ["users", "@me"]:
            self.requests["GET me"] += 1
            return self._ok(self.bot)
        if p == ["oauth2", "applications", "@me"]:
            return self._ok(self._application())
        if p == ["gateway", "bot"]:
            self.requests["GET gateway/bot"] += 1
            return self._ok(
                {
                    "url": self.gateway_url,
                    "shards": 1,
                    "session_start_limit": {
                        "total": 1000,
                        "remaining": 999,
                        "reset_after": 0,
                        "max_concurrency": 1,
                    },
                }
            )
        if p[0] == "channels" and len(p) >= 2:
            return await self._channel_route(method, int(p[1]), p[2:], body, request)
        if p[0] == "applications" and len(p) >= 3:
            if p[2] == "commands" and len(p) == 3:
                return self._commands(method, self.global_commands, None, body)
            if p[2] == "guilds" and len(p) == 5 and p[4] == "commands":
                gid = int(p[3])
                return self._commands(method, self.guild_commands[gid], gid, body)
        if p[0] == "interactions" and len(p) == 4 and p[3] == "callback":
            return self._callback(p[1], p[2], body)
        if p[0] == "webhooks" and len(p) >= 3:
            token = p[2]
            if method == "PATCH" and p[3:] == ["messages", "@original"]:
                self.requests["PATCH @original"] += 1
                self.original_edits[token].append(body.get("content", ""))
                return self._ok(self._message_json(self._interaction_message(token, body)))
            if method == "DELETE" and p[3:] == ["messages", "@original"]:
                self.requests["DELETE @original"] += 1
                self.originals_deleted.add(token)
                return self._ok(None)
            if method == "POST" and len(p) == 3:
                self.requests["POST followup"] += 1
                self.followups[token].append(body.get("content", ""))
                self.followup_bodies[token].append(body)
                return self._ok(self._message_json(self._interaction_message(token, body)))
        return self._error(404, 0, f"404: Not Found ({method} {'/'.join(parts)})")

    async def _channel_route(
        self, method: str, cid: int, rest: list[str], body: Json, request: web.Request
    ) -> web.Response:
        if cid not in self.channels:
            return self._error(404, UNKNOWN_CHANNEL, "Unknown Channel")
        if not rest and method == "GET":
            self.requests["GET channel"] += 1
            return self._ok(self.channels[cid])
        if rest == ["typing"] and method == "POST":
            self.typing[cid] += 1
            return self._ok(None)
        if rest == ["messages"] and method == "POST":
            if (raw := self._raw_answer("POST message")) is not None:
                return raw
            limited = self._limit("post", cid)
            if limited is not None:
                return limited
            self.requests["POST message"] += 1
            msg = self._store_message(cid, self.bot, body.get("content", ""), body)
            return self._ok(self._message_json(msg), f"post:{cid}")
        if rest == ["messages"] and method == "GET":
            self.requests["GET messages"] += 1
            before = int(request.query.get("before", "0") or 0)
            limit = int(request.query.get("limit", "50"))
            found = [m for m in self.messages_in(cid) if not before or m.id < before]
            found.sort(key=lambda m: m.id, reverse=True)
            return self._ok([self._message_json(m) for m in found[:limit]])
        if len(rest) == 2 and rest[0] == "messages" and method == "PATCH":
            mid = int(rest[1])
            if (raw := self._raw_answer("PATCH message")) is not None:
                return raw
            limited = self._limit("edit", cid)
            if limited is not None:
                return limited
            msg = self.messages.get(mid)
            if msg is None or msg.channel_id != cid:
                return self._error(404, UNKNOWN_MESSAGE, "Unknown Message")
            self.requests["PATCH message"] += 1
            if "content" in body:
                msg.states.append(body["content"] or "")
                msg.times.append(self.clock())
            if "components" in body:
                msg.components = list(body["components"] or [])
            msg.payloads.append(body)
            return self._ok(self._message_json(msg), f"edit:{cid}")
        if len(rest) == 3 and rest[0] == "messages" and rest[2] == "threads" and method == "POST":
            return await self._start_thread(cid, int(rest[1]), body)
        return self._error(404, 0, "404: Not Found")

    async def _start_thread(self, cid: int, mid: int, body: Json) -> web.Response:
        self.requests["POST thread"] += 1
        self.thread_starts[mid] += 1
        if cid in self.no_thread_permission:
            return self._error(403, MISSING_PERMISSIONS, "Missing Permissions")
        if mid in self.channels:
            return self._error(
                400, THREAD_ALREADY_CREATED, "A thread has already been created for this message"
            )
        name = str(body.get("name", ""))
        if not 1 <= len(name) <= 100:
            return self._error(400, 50035, "Invalid Form Body (name)")
        # A thread started on a message takes the message's id.
        self.channels[mid] = payload = self._thread_payload(mid, cid, name, self.bot["id"])
        await self.dispatch("THREAD_CREATE", {**payload, "newly_created": True})
        return self._ok(payload, status=201)

    def _commands(self, method: str, store: list[Json], gid: int | None, body: Any) -> web.Response:
        if method == "GET":
            self.requests["GET commands"] += 1
            return self._ok(store)
        if method == "PUT":
            self.requests["PUT commands"] += 1
            store.clear()
            for cmd in body:
                entry = {
                    "id": str(self.snowflake()),
                    "application_id": str(self.app_id),
                    "version": str(self.snowflake()),
                    "type": 1,
                    # Discord answers "" for context-menu commands, which send none.
                    "description": "",
                    "default_member_permissions": None,
                    "nsfw": False,
                    "options": [],
                    **cmd,
                }
                if gid is not None:
                    entry["guild_id"] = str(gid)
                store.append(entry)
            return self._ok(store)
        return self._error(405, 0, "405: Method Not Allowed")

    def _callback(self, iid: str, token: str, body: Json) -> web.Response:
        self.requests["POST callback"] += 1
        self.callbacks.append({"id": iid, "token": token, "at": self.clock(), **body})
        data = body.get("data") or {}
        kind = body.get("type")
        if kind == 4:
            self.original_edits[token].append(data.get("content", ""))
        msg = self._interaction_message(token, data)
        return self._ok(
            {
                "interaction": {
                    "id": iid,
                    "type": 2,
                    "response_message_id": str(msg.id),
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(int(data.get("flags") or 0) & 64),
                },
                "resource": {"type": kind, "message": self._message_json(msg)},
            }
        )

    def _interaction_message(self, token: str, body: Json) -> FakeMessage:
        cid = self._interaction_channels.get(token, self.text_channel)
        return FakeMessage(self.snowflake(), cid, self.bot, [body.get("content") or ""])

    def _application(self) -> Json:
        return {
            "id": str(self.app_id),
            "name": "threadbot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "verify_key": "0" * 64,
            "flags": 0,
            "interactions_endpoint_url": None,
        }

    async def _attachment(self, request: web.Request) -> web.Response:
        data = self.attachments.get(request.path)
        if data is None:
            return web.Response(status=404)
        self.downloads[request.path] += 1
        return web.Response(body=data)

    # ---- messages ----------------------------------------------------------------------------

    def _store_message(self, cid: int, author: Json, content: str, body: Json) -> FakeMessage:
        ref = (body.get("message_reference") or {}).get("message_id")
        msg = FakeMessage(self.snowflake(), cid, author, [content], int(ref) if ref else None)
        msg.payloads.append(body)
        msg.times.append(self.clock())
        msg.components = list(body.get("components") or [])
        self.messages[msg.id] = msg
        return msg

    def _message_json(self, msg: FakeMessage) -> Json:
        channel = self.channels.get(msg.channel_id, {})
        data: Json = {
            "id": str(msg.id),
            "channel_id": str(msg.channel_id),
            "author": msg.author,
            "content": msg.content,
            "timestamp": _iso(),
            "edited_timestamp": _iso() if len(msg.states) > 1 else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": msg.attachments,
            "embeds": [],
            "pinned": False,
            "type": 19 if msg.reference else 0,
            "flags": 0,
            "components": msg.components,
        }
        if channel.get("guild_id"):
            data["guild_id"] = channel["guild_id"]
        if msg.reference:
            data["message_reference"] = {
                "message_id": str(msg.reference),
                "channel_id": str(msg.channel_id),
            }
        return data

    def user_message(
        self,
        channel_id: int,
        content: str,
        *,
        author: Json | None = None,
        mention: bool = True,
        mention_role: bool = False,
        attachments: list[Json] | None = None,
        message_type: int = 0,
        webhook_id: int | None = None,
    ) -> Json:
        """A MESSAGE_CREATE payload from a person (recorded as a message in the channel);
        ``mention_role`` mentions the bot's role instead of its user."""
        author = author or self.owner
        text = f"<@{self.bot['id']}> {content}" if mention else content
        if mention_role:
            text = f"<@&{self.bot_role_id}> {content}"
        msg = self._store_message(channel_id, author, text, {})
        msg.attachments = list(attachments or [])
        data = self._message_json(msg)
        data["type"] = message_type
        data["mentions"] = [self.bot] if mention else []
        data["mention_roles"] = [str(self.bot_role_id)] if mention_role else []
        if webhook_id is not None:
            data["webhook_id"] = str(webhook_id)
        if "guild_id" in data:
            # As Discord sends it (discord.py makes the author a Member only with every field).
            data["member"] = {
                "roles": [],
                "joined_at": _iso(),
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
        return data

    async def send_message(self, channel_id: int, content: str, **kwargs: Any) -> Json:
        """Record a person's message and dispatch its MESSAGE_CREATE; return the payload."""
        data = self.user_message(channel_id, content, **kwargs)
        await self.dispatch("MESSAGE_CREATE", data)
        return data

    async def send_interaction(
        self,
        name: str,
        channel_id: int,
        *,
        subcommand: str | None = None,
        options: dict[str, str | int] | None = None,
        permissions: int = 0,
        user: Json | None = None,
    ) -> str:
        """Dispatch an app command invocation; return its token (key of ``original_edits``)."""
        command = self._command_data(name, subcommand, options or {})
        data = self._interaction_base(
            2, channel_id, user or self.owner, command, permissions=permissions
        )
        return await self._dispatch_interaction(data)

    async def autocomplete(
        self,
        name: str,
        channel_id: int,
        *,
        focused: str,
        subcommand: str | None = None,
        options: dict[str, str | int] | None = None,
        permissions: int = 0,
        user: Json | None = None,
    ) -> str:
        """What a client sends while someone types option ``focused`` of command ``name`` (an
        autocomplete interaction, type 4, the typed value so far in ``options``); return its
        token (see ``choices``)."""
        command = self._command_data(name, subcommand, options or {}, focused=focused)
        data = self._interaction_base(
            4, channel_id, user or self.owner, command, permissions=permissions
        )
        return await self._dispatch_interaction(data)

    def choices(self, token: str) -> list[Json] | None:
        """The choices an autocomplete interaction was answered with (callback type 8)."""
        for callback in self.callbacks:
            if callback["token"] == token and callback.get("type") == 8:
                return list((callback.get("data") or {}).get("choices") or [])
        return None

    async def context_menu(
        self, name: str, message_id: int, *, user: Json | None = None, permissions: int = 0
    ) -> str:
        """A message context-menu command (Apps > ``name``) on message ``message_id``: an
        application command interaction (type 2) of command type 3 with ``target_id`` and the
        message in ``resolved.messages``; return its token."""
        msg = self.messages[message_id]
        command = {
            "id": str(self.snowflake()),
            "name": name,
            "type": 3,
            "target_id": str(msg.id),
            "resolved": {"messages": {str(msg.id): self._message_json(msg)}},
        }
        data = self._interaction_base(
            2, msg.channel_id, user or self.owner, command, permissions=permissions
        )
        return await self._dispatch_interaction(data)

    def _command_data(
        self,
        name: str,
        subcommand: str | None,
        options: dict[str, str | int],
        *,
        focused: str | None = None,
    ) -> Json:
        # Option types as Discord sends them: 4 INTEGER, 3 STRING.
        opts: list[Json] = []
        for key, value in options.items():
            option: Json = {"name": key, "type": 4 if isinstance(value, int) else 3, "value": value}
            if key == focused:
                option["focused"] = True
            opts.append(option)
        if focused is not None and focused not in options:
            opts.append({"name": focused, "type": 3, "value": "", "focused": True})
        if subcommand is not None:
            opts = [{"name": subcommand, "type": 1, "options": opts}]
        return {"id": str(self.snowflake()), "name": name, "type": 1, "options": opts}

    async def _dispatch_interaction(self, payload: Json) -> str:
        token = str(payload["token"])
        self.interaction_times[token] = self.clock()
        await self.dispatch("INTERACTION_CREATE", payload)
        return token

    def responses(self, token: str) -> list[Json]:
        """The callbacks interaction ``token`` was answered with, in order (normally one)."""
        return [c for c in self.callbacks if c["token"] == token]

    def acknowledged_after(self, token: str) -> float | None:
        """Seconds from dispatching interaction ``token`` to its first callback (None: none)."""
        sent = self.interaction_times.get(token)
        answers = self.responses(token)
        if sent is None or not answers:
            return None
        return float(answers[0]["at"]) - sent

    def _interaction_base(
        self, kind: int, channel_id: int, user: Json, data: Json, *, permissions: int = 0
    ) -> Json:
        """An INTERACTION_CREATE payload of ``kind`` by ``user`` in ``channel_id``, who holds
        ``permissions`` there (the bitfield Discord computes for the member)."""
        channel = self.channels[channel_id]
        token = uuid.uuid4().hex
        self._interaction_channels[token] = channel_id
        payload: Json = {
            "id": str(self.snowflake()),
            "application_id": str(self.app_id),
            "type": kind,
            "token": token,
            "version": 1,
            "data": data,
            "channel_id": str(channel_id),
            "channel": channel,
            "locale": "en-US",
            "attachment_size_limit": 10_485_760,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "app_permissions": str(permissions),
        }
        if channel.get("guild_id"):
            payload["guild_id"] = channel["guild_id"]
            payload["guild_locale"] = "en-US"
            payload["context"] = 0
            payload["member"] = {
                "user": user,
                "roles": [],
                "joined_at": _iso(),
                "deaf": False,
                "mute": False,
                "permissions": str(permissions),
                "flags": 0,
            }
        else:
            payload["context"] = 1
            payload["user"] = user
        return payload

    async def click(self, message_id: int, custom_id: str, *, user: Json | None = None) -> str:
        """A click on a button of a message (a component interaction, type 3, with the message
        as Discord sends it); return its token (key of ``followups`` and ``callbacks``)."""
        msg = self.messages[message_id]
        # Discord delivers clicks only on components the message carries.
        assert custom_id in msg.custom_ids(), f"message {message_id} has no button {custom_id}"
        data = {"custom_id": custom_id, "component_type": 2}
        payload = self._interaction_base(3, msg.channel_id, user or self.owner, data)
        payload["message"] = self._message_json(msg)
        return await self._dispatch_interaction(payload)

    def modal_opened(self, token: str) -> Json | None:
        """The modal an interaction was answered with (callback type 9), if any."""
        for callback in self.callbacks:
            if callback["token"] == token and callback.get("type") == 9:
                return dict(callback.get("data") or {})
        return None

    async def submit_modal(
        self, token: str, values: dict[str, str], *, user: Json | None = None
    ) -> str:
        """Submit the modal opened in answer to interaction ``token`` (type 5), its text inputs
        filled from ``values`` by custom id, in the layout the modal was sent with."""
        modal = self.modal_opened(token)
        assert modal is not None, "no modal was opened for that interaction"

        def filled(component: Json) -> Json:
            if component.get("type") == 1:
                return {"type": 1, "components": [filled(c) for c in component["components"]]}
            if component.get("type") == 18:
                return {"type": 18, "component": filled(component["component"])}
            custom_id = str(component.get("custom_id"))
            return {"type": 4, "custom_id": custom_id, "value": values.get(custom_id, "")}

        data = {
            "custom_id": modal["custom_id"],
            "components": [filled(c) for c in modal.get("components") or ()],
        }
        channel_id = self._interaction_channels[token]
        payload = self._interaction_base(5, channel_id, user or self.owner, data)
        return await self._dispatch_interaction(payload)

    # ---- gateway -----------------------------------------------------------------------------

    def _guild_payload(self) -> Json:
        guild_channels = [c for c in self.channels.values() if c.get("guild_id")]
        everyone = {
            "id": str(self.guild_id),
            "name": "@everyone",
            "permissions": str(self.everyone_permissions),
            "position": 0,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        bot_role = {
            **everyone,
            "id": str(self.bot_role_id),
            "name": self.bot["username"],
            "position": 1,
            "managed": True,
            "mentionable": True,
            "tags": {"bot_id": self.bot["id"]},
        }
        return {
            "id": str(self.guild_id),
            "name": "Test guild",
            "icon": None,
            "owner_id": self.owner["id"],
            "roles": [everyone, bot_role],
            "emojis": [],
            "stickers": [],
            "features": [],
            "channels": [c for c in guild_channels if c["type"] != PUBLIC_THREAD],
            "threads": [c for c in guild_channels if c["type"] == PUBLIC_THREAD],
            "members": [
                {
                    "user": self.bot,
                    "roles": [str(self.bot_role_id)],
                    "joined_at": _iso(),
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                }
            ],
            "member_count": 2,
            "large": False,
            "unavailable": False,
            "joined_at": _iso(),
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "preferred_locale": "en-US",
            "system_channel_flags": 0,
        }

    async def dispatch(self, event: str, data: Json) -> int:
        """Send a DISPATCH on the current session (queued for RESUME while no socket is attached)."""
        session = self.session
        if session is None:
            raise RuntimeError("no gateway session: the bot has not identified")
        session.seq += 1
        session.events.append((session.seq, event, data))
        if session.ws is not None and not session.ws.closed:
            await session.ws.send_json({"op": 0, "t": event, "s": session.seq, "d": data})
        return session.seq

    async def force_reconnect(self, *, missed: Sequence[Json] = (), replay_last: int = 0) -> None:
        """Ask the bot to reconnect (op 7) and record ``missed`` MESSAGE_CREATEs for the RESUME.

        ``replay_last`` also re-sends that many events the bot already received, as Discord may
        when a resume point is older than what the client processed.
        """
        session = self.session
        assert session is not None and session.ws is not None
        ws, session.ws = session.ws, None
        self._replay_extra = replay_last
        for data in missed:
            await self.dispatch("MESSAGE_CREATE", data)
        await ws.send_json({"op": 7, "d": None})

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41_250}})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(msg.data)
                op, d = payload.get("op"), payload.get("d")
                if op == 1:
                    await ws.send_json({"op": 11})
                elif op == 2:
                    await self._identify(ws, d)
                elif op == 6:
                    await self._resume(ws, d)
        finally:
            self._sockets.discard(ws)
            self._touch()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, d: Json) -> None:
        self.identifies += 1
        intents = int(d.get("intents", 0))
        if d.get("token") != BOT_TOKEN:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if intents & self.refuse_intents:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        session = Session(uuid.uuid4().hex, intents, ws)
        self.sessions[session.id] = self.session = session
        ready = {
            "v": 10,
            "user": self.bot,
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url + "?resume=1",
            "application": {"id": str(self.app_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }
        await self.dispatch("READY", ready)
        await self.dispatch("GUILD_CREATE", self._guild_payload())
        self.greeted += 1
        self._touch()

    async def _resume(self, ws: web.WebSocketResponse, d: Json) -> None:
        session = self.sessions.get(d.get("session_id", ""))
        if session is None:
            await ws.send_json({"op": 9, "d": False})
            return
        self.resumes += 1
        start = int(d.get("seq") or 0) - self._replay_extra
        self._replay_extra = 0
        for seq, event, data in session.events:
            if seq > start:
                await ws.send_json({"op": 0, "t": event, "s": seq, "d": data})
        session.ws = ws
        await self.dispatch("RESUMED", {})
        self._touch()

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.ws is not None
