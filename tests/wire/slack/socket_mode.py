"""Slack's Socket Mode on the fake: ``apps.connections.open`` and the websocket behind it.

It speaks the protocol as slack_sdk's aiohttp ``SocketModeClient`` (the client Bolt's
``AsyncSocketModeHandler`` runs) and docs.slack.dev "Using Socket Mode" describe it:

- ``apps.connections.open`` with the app-level token (``xapp-...``) in ``Authorization: Bearer``
  answers ``{"ok": true, "url": "ws://127.0.0.1:PORT/link/?ticket=..."}``. A bot token gets
  ``not_allowed_token_type`` (Slack's answer to an xoxb token there), any other token
  ``invalid_auth``, none ``not_authed``. A websocket asking for a ticket never issued gets 401;
  ``socket_unavailable`` makes every websocket request fail with that HTTP status.
- On connect the server sends ``{"type": "hello", "num_connections", "connection_info",
  "debug_info"}``.
- Deliveries are envelopes ``{"envelope_id", "type": "events_api" | "slash_commands",
  "payload", "accepts_response_payload", "retry_attempt", "retry_reason"}``; the app acks each
  with ``{"envelope_id", "payload"?}`` on the same socket. Acks are recorded (``acks``), and so
  is anything else the client sends (``unexpected``).
- Websocket pings are answered with a pong carrying the same bytes (slack_sdk pings right after
  connecting, then every ``ping_interval``, and reconnects when pongs stop); they are counted.
- ``disconnect(reason)`` sends ``{"type": "disconnect", "reason": ...}``; slack_sdk then asks
  ``apps.connections.open`` for a new URL, connects again and closes the old socket. Envelopes
  go to the newest connection that is open and was not asked to disconnect.

``SocketModeSender`` plays Slack's side with the same verbs as the HTTP ``SlackSender``
(``mention``, ``message``, ``event``, ``command``), delivering over the socket and answering with
the ack.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import WSMsgType, web

from .sender import Answer, SlackSender
from .server import FakeSlack, Team

#: The path slack_sdk connects to (Slack's real URLs are ``wss://wss-primary.slack.com/link/``).
LINK_PATH = "/link/"
#: Seconds a delivery waits for its ack before the test fails: Slack itself redelivers after 3 s,
#: and the bound is wider so a loaded CI machine fails only when no ack comes at all.
ACK_WITHIN_SECONDS = 20.0


@dataclass
class Connection:
    """One websocket the app opened, in the order they were opened (``number`` from 1)."""

    number: int
    ticket: str
    socket: web.WebSocketResponse
    pings: int = 0
    #: Sent a ``disconnect``: no more envelopes go to it.
    retiring: bool = False
    closed: bool = False
    #: When it closed, on the fake's clock (the clock ``Message.times`` use).
    closed_at: float | None = None
    received: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Ack:
    """The app's acknowledgement of one envelope, and the connection it came back on."""

    envelope_id: str
    payload: dict[str, Any] | None
    connection: int
    #: When it arrived, on the fake's clock.
    at: float


class SocketModeSlack(FakeSlack):
    """``FakeSlack`` plus Socket Mode: ``apps.connections.open`` and the ``/link/`` websocket."""

    def __init__(
        self,
        *,
        app_token: str = "xapp-1-A0001-1-0123456789abcdef",
        app_id: str = "A0001",
        teams: tuple[Team, ...] = (Team("T0001", "xoxb-test-token", "UBOT", "BBOT"),),
        **kwargs: Any,
    ) -> None:
        super().__init__(teams=teams, **kwargs)
        self.app_token = app_token
        self.app_id = app_id
        self.connections: list[Connection] = []
        self.acks: dict[str, Ack] = {}
        #: Every envelope sent, in order, as it went on the wire.
        self.envelopes: list[dict[str, Any]] = []
        #: Client messages that are neither an ack of a sent envelope nor valid JSON.
        self.unexpected: list[str] = []
        #: apps.connections.open answers, in order: the error code, or None for a URL.
        self.opens: list[str | None] = []
        #: When set, the websocket endpoint answers this HTTP status (Slack's socket host down);
        #: ``refused`` counts the attempts turned away.
        self.socket_unavailable: int | None = None
        self.refused = 0
        self._tickets: set[str] = set()
        self._ticket_numbers = itertools.count(1)
        self._envelope_numbers = itertools.count(1)
        self._changed = asyncio.Condition()

    # -- the wire ----------------------------------------------------------------------------

    def web_app(self) -> web.Application:
        app = super().web_app()
        app.router.add_get(LINK_PATH, self._socket)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["method"] == "apps.connections.open":
            return await self._connections_open(request)
        return await super()._handle(request)

    async def _connections_open(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token == self.app_token:
            ticket = f"ticket-{next(self._ticket_numbers)}"
            self._tickets.add(ticket)
            await self._note(None, self.opens)
            url = f"ws://127.0.0.1:{self.port}{LINK_PATH}?ticket={ticket}&app_id={self.app_id}"
            return web.json_response({"ok": True, "url": url})
        error = (
            "not_authed"
            if not token
            else "not_allowed_token_type"
            if token in self.teams
            else "invalid_auth"
        )
        await self._note(error, self.opens)
        return web.json_response({"ok": False, "error": error})

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if self.socket_unavailable:
            self.refused += 1
            await self._note()
            return web.json_response({"ok": False}, status=self.socket_unavailable)
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.json_response({"ok": False, "error": "invalid_ticket"}, status=401)
        # Pings and the closing handshake are answered by hand so they can be recorded.
        socket = web.WebSocketResponse(autoping=False, autoclose=False)
        await socket.prepare(request)
        connection = Connection(len(self.connections) + 1, ticket, socket)
        self.connections.append(connection)
        await socket.send_json(
            {
                "type": "hello",
                "num_connections": sum(not c.closed for c in self.connections),
                "debug_info": {
                    "host": "applink-fake",
                    "build_number": 1,
                    "approximate_connection_time": 18060,
                },
                "connection_info": {"app_id": self.app_id},
            }
        )
        await self._note()
        try:
            while True:
                message = await socket.receive()
                if message.type == WSMsgType.PING:
                    connection.pings += 1
                    await socket.pong(message.data)
                    await self._note()
                elif message.type == WSMsgType.TEXT:
                    await self._received(connection, str(message.data))
                elif message.type == WSMsgType.CLOSE:
                    # Noted before the close is answered: the client's close() returns after.
                    connection.closed_at = self._now()
                    await socket.close()
                    break
                elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        finally:
            connection.closed = True
            if connection.closed_at is None:
                connection.closed_at = self._now()
            await self._note()
        return socket

    async def _received(self, connection: Connection, raw: str) -> None:
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            await self._note(raw, self.unexpected)
            return
        envelope_id = message.get("envelope_id") if isinstance(message, dict) else None
        known = {e["envelope_id"] for e in self.envelopes}
        if not isinstance(envelope_id, str) or envelope_id not in known or envelope_id in self.acks:
            await self._note(raw, self.unexpected)
            return
        connection.received.append(message)
        payload = message.get("payload")
        self.acks[envelope_id] = Ack(envelope_id, payload, connection.number, self._now())
        await self._note()

    async def _note(self, item: Any = None, into: list[Any] | None = None) -> None:
        """Record ``item`` (if any) and wake everyone waiting for a change."""
        async with self._changed:
            if into is not None:
                into.append(item)
            self._changed.notify_all()

    # -- test verbs ----------------------------------------------------------------------------

    async def until(
        self, condition: Callable[[], bool], within: float = ACK_WITHIN_SECONDS
    ) -> None:
        """Wait until ``condition()`` holds (checked after every change on the socket)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(condition), timeout=within)

    def live_connections(self) -> list[Connection]:
        """Connections open and not asked to disconnect: where envelopes may go."""
        return [c for c in self.connections if not c.closed and not c.retiring]

    async def connected(self, count: int = 1, within: float = ACK_WITHIN_SECONDS) -> Connection:
        """Wait until ``count`` connections were opened in all and one is live; return the
        newest live one."""
        await self.until(
            lambda: len(self.connections) >= count and bool(self.live_connections()), within
        )
        return self.live_connections()[-1]

    async def send_envelope(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        retry_attempt: int = 0,
        retry_reason: str = "",
        envelope_id: str | None = None,
    ) -> str:
        """Deliver one envelope on the newest open connection; return its envelope id."""
        connection = await self.connected()
        envelope_id = envelope_id or f"env-{next(self._envelope_numbers):06d}"
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            # Slack takes a response payload in the ack of commands and interactivity only.
            "accepts_response_payload": kind != "events_api",
        }
        if kind == "events_api":
            envelope["retry_attempt"] = retry_attempt
            envelope["retry_reason"] = retry_reason
        self.envelopes.append(envelope)
        await connection.socket.send_json(envelope)
        return envelope_id

    async def ack(self, envelope_id: str, within: float = ACK_WITHIN_SECONDS) -> Ack:
        """The app's ack of ``envelope_id``, waiting for it."""
        await self.until(lambda: envelope_id in self.acks, within)
        return self.acks[envelope_id]

    async def disconnect(self, reason: str = "refresh_requested") -> Connection:
        """Ask the app to move to a new connection, as Slack does every few hours."""
        connection = await self.connected()
        connection.retiring = True
        await connection.socket.send_json(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-fake"}}
        )
        return connection

    async def stop(self) -> None:
        for connection in self.connections:
            if not connection.closed:
                await connection.socket.close()
        await super().stop()


class SocketModeSender(SlackSender):
    """``SlackSender``'s verbs over Socket Mode: each request is an envelope, its answer the ack.

    Events go as ``events_api`` envelopes (the HTTP retry headers become ``retry_attempt`` /
    ``retry_reason``), slash commands as ``slash_commands`` envelopes whose payload is the form
    Slack would have posted. The returned ``Answer`` is 200 with the ack's payload as its body.
    Socket Mode requests are not signed, so the HTTP-only arguments (``secret``, ``signature``,
    ``timestamp``) do not apply.
    """

    def __init__(
        self, fake: SocketModeSlack, session: aiohttp.ClientSession, *, api_app_id: str = "A0001"
    ) -> None:
        super().__init__(
            fake.url,
            "",
            session,
            team_id=fake.team.team_id,
            api_app_id=api_app_id,
            bot_user_id=fake.team.bot_user_id,
        )
        self.fake = fake
        #: The envelope id of every request sent, in order.
        self.envelope_ids: list[str] = []

    async def post(
        self,
        body: str,
        content_type: str,
        *,
        retry_num: int | None = None,
        retry_reason: str = "timeout",
        **http_only: Any,
    ) -> Answer:
        if http_only:
            raise TypeError(f"not used over Socket Mode: {sorted(http_only)}")
        if content_type == "application/json":
            kind, payload = "events_api", json.loads(body)
        else:
            kind, payload = "slash_commands", dict(parse_qsl(body))
        envelope_id = await self.fake.send_envelope(
            kind,
            payload,
            retry_attempt=retry_num or 0,
            retry_reason=retry_reason if retry_num else "",
        )
        self.envelope_ids.append(envelope_id)
        ack = await self.fake.ack(envelope_id)
        return Answer(200, json.dumps(ack.payload) if ack.payload else "")
