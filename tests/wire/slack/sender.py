"""Signed requests as Slack sends them to an app's Request URL (events, slash commands, and
interactivity: ``block_actions`` clicks and ``view_submission`` modals, form-encoded as
``payload=<json>``).

Bodies are signed with slack_sdk's ``SignatureVerifier`` scheme (``v0=`` HMAC-SHA256 of
``v0:<timestamp>:<body>`` with the signing secret) and POSTed over HTTP to the real Bolt app.
Redeliveries carry ``X-Slack-Retry-Num`` / ``X-Slack-Retry-Reason`` as Slack's retries do.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from slack_sdk.signature import SignatureVerifier


@dataclass(frozen=True, slots=True)
class Answer:
    """What the app answered: HTTP status, body text, and the body as JSON when it is JSON."""

    status: int
    body: str

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class SlackSender:
    """Plays Slack's side of the Events API and slash commands against ``url``."""

    def __init__(
        self,
        url: str,
        signing_secret: str,
        session: aiohttp.ClientSession,
        *,
        team_id: str = "T0001",
        api_app_id: str = "A0001",
        bot_user_id: str = "UBOT",
    ) -> None:
        self.url = url
        self.signing_secret = signing_secret
        self.session = session
        self.team_id = team_id
        self.api_app_id = api_app_id
        self.bot_user_id = bot_user_id
        self._event_ids = itertools.count(1)

    async def post(
        self,
        body: str,
        content_type: str,
        *,
        retry_num: int | None = None,
        retry_reason: str = "http_timeout",
        timestamp: int | None = None,
        secret: str | None = None,
        signature: str | None = None,
    ) -> Answer:
        """POST ``body`` signed (with another ``secret`` or a given ``signature`` to forge it)."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        verifier = SignatureVerifier(secret or self.signing_secret)
        headers = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": signature
            or verifier.generate_signature(timestamp=ts, body=body)
            or "",
        }
        if retry_num is not None:
            headers["X-Slack-Retry-Num"] = str(retry_num)
            headers["X-Slack-Retry-Reason"] = retry_reason
        async with self.session.post(self.url, data=body.encode(), headers=headers) as response:
            return Answer(response.status, await response.text())

    def envelope(self, event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        """An ``event_callback`` envelope around ``event``, as the Events API delivers it."""
        return {
            "token": "legacy-verification-token",
            "team_id": self.team_id,
            "api_app_id": self.api_app_id,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._event_ids):08d}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
        }

    async def event(
        self, event: dict[str, Any], *, event_id: str | None = None, **kwargs: Any
    ) -> Answer:
        """Deliver one event (``kwargs`` as for ``post``: retry_num, timestamp, secret, ...)."""
        body = json.dumps(self.envelope(event, event_id=event_id))
        return await self.post(body, "application/json", **kwargs)

    async def mention(
        self,
        text: str,
        *,
        channel: str = "C0001",
        ts: str,
        user: str = "U_ALICE",
        thread_ts: str | None = None,
        both: bool = True,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Answer]:
        """A channel message mentioning the bot, delivered as Slack does: as ``app_mention`` and,
        when ``both``, also as ``message`` (two events with different event ids). ``extra``
        goes into both events (``files``, a ``subtype``)."""
        base: dict[str, Any] = {
            "user": user,
            "text": f"<@{self.bot_user_id}> {text}".rstrip(),
            "ts": ts,
            "channel": channel,
            "team": self.team_id,
            "event_ts": ts,
        }
        if thread_ts:
            base["thread_ts"] = thread_ts
        base.update(extra or {})
        answers = [await self.event({"type": "app_mention", **base}, **kwargs)]
        if both:
            answers.append(
                await self.event({"type": "message", "channel_type": "channel", **base}, **kwargs)
            )
        return answers

    async def message(
        self,
        text: str,
        *,
        channel: str = "C0001",
        ts: str,
        user: str = "U_ALICE",
        thread_ts: str | None = None,
        channel_type: str = "channel",
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Answer:
        """A plain ``message`` event (a thread reply, a DM with channel_type "im", ...)."""
        event: dict[str, Any] = {
            "type": "message",
            "channel_type": channel_type,
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "team": self.team_id,
            "event_ts": ts,
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        event.update(extra or {})
        return await self.event(event, **kwargs)

    async def assistant_thread_started(
        self,
        *,
        channel: str = "D0001",
        thread_ts: str,
        user: str = "U_ALICE",
        context_channel: str | None = None,
        **kwargs: Any,
    ) -> Answer:
        """``assistant_thread_started``: a person opened a new assistant thread with the app."""
        context: dict[str, Any] = {}
        if context_channel:
            context = {"channel_id": context_channel, "team_id": self.team_id}
        event = {
            "type": "assistant_thread_started",
            "assistant_thread": {
                "user_id": user,
                "context": context,
                "channel_id": channel,
                "thread_ts": thread_ts,
            },
            "event_ts": thread_ts,
        }
        return await self.event(event, **kwargs)

    async def app_home_opened(
        self, *, channel: str = "D0001", user: str = "U_ALICE", tab: str = "messages", **kwargs: Any
    ) -> Answer:
        """``app_home_opened``: a person opened the app's DM (``tab`` "messages") or Home tab;
        in the Agent messaging experience this replaces ``assistant_thread_started``."""
        event = {
            "type": "app_home_opened",
            "user": user,
            "channel": channel,
            "tab": tab,
            "event_ts": f"{time.time():.6f}",
        }
        return await self.event(event, **kwargs)

    async def agent_session_stopped(
        self,
        *,
        channel: str,
        thread_ts: str,
        user: str = "U_ALICE",
        streaming_message_ts: list[str] | None = None,
        event_ts: str | None = None,
        **kwargs: Any,
    ) -> Answer:
        """``agent_session_stopped``: a person clicked the stop button of an agent session."""
        event = {
            "type": "agent_session_stopped",
            "channel": channel,
            "thread_ts": thread_ts,
            "user": user,
            "streaming_message_ts": list(streaming_message_ts or []),
            "event_ts": event_ts or f"{time.time():.6f}",
        }
        return await self.event(event, **kwargs)

    async def command(
        self,
        command: str,
        text: str,
        *,
        channel: str = "C0001",
        channel_name: str = "general",
        user: str = "U_ALICE",
        response_url: str = "http://127.0.0.1:9/unused",
        **kwargs: Any,
    ) -> Answer:
        """A slash command, form-encoded as Slack posts it."""
        body = urlencode(
            {
                "token": "legacy-verification-token",
                "team_id": self.team_id,
                "team_domain": "test",
                "channel_id": channel,
                "channel_name": channel_name,
                "user_id": user,
                "user_name": user.lower(),
                "command": command,
                "text": text,
                "api_app_id": self.api_app_id,
                "is_enterprise_install": "false",
                "response_url": response_url,
                "trigger_id": "1.2.3",
            }
        )
        return await self.post(body, "application/x-www-form-urlencoded", **kwargs)

    async def interaction(self, payload: dict[str, Any], **kwargs: Any) -> Answer:
        """An interactivity payload, as Slack posts it: form-encoded ``payload=<json>``."""
        body = urlencode({"payload": json.dumps(payload)})
        return await self.post(body, "application/x-www-form-urlencoded", **kwargs)

    async def click(
        self,
        value: str,
        *,
        action_id: str,
        channel: str,
        message_ts: str,
        thread_ts: str | None = None,
        user: str = "U_ALICE",
        element: str = "feedback_buttons",
        trigger_id: str = "10.20.30",
        response_url: str = "http://127.0.0.1:9/unused",
    ) -> Answer:
        """A ``block_actions`` click on a button of a message in ``channel``."""
        container: dict[str, Any] = {
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": False,
        }
        if thread_ts:
            container["thread_ts"] = thread_ts
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "team_id": self.team_id},
            "api_app_id": self.api_app_id,
            "token": "legacy-verification-token",
            "container": container,
            "trigger_id": trigger_id,
            "team": {"id": self.team_id, "domain": "test"},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel, "name": "general"},
            "message": {"type": "message", "ts": message_ts, "user": self.bot_user_id},
            "response_url": response_url,
            "actions": [
                {
                    "type": element,
                    "action_id": action_id,
                    "block_id": "fb",
                    "value": value,
                    "action_ts": str(time.time()),
                }
            ],
        }
        return await self.interaction(payload)

    async def submit_view(
        self, view: dict[str, Any], values: dict[str, dict[str, str]], *, user: str = "U_ALICE"
    ) -> Answer:
        """A ``view_submission`` of a modal the app opened (``views.open``), with text inputs
        ``values`` as ``{block_id: {action_id: text}}``."""
        state = {
            block: {action: {"type": "plain_text_input", "value": text}}
            for block, inputs in values.items()
            for action, text in inputs.items()
        }
        payload = {
            "type": "view_submission",
            "team": {"id": self.team_id, "domain": "test"},
            "user": {"id": user, "username": user.lower(), "team_id": self.team_id},
            "api_app_id": self.api_app_id,
            "token": "legacy-verification-token",
            "trigger_id": "11.22.33",
            "view": {
                "id": "V0001",
                "team_id": self.team_id,
                "type": "modal",
                "callback_id": view.get("callback_id", ""),
                "private_metadata": view.get("private_metadata", ""),
                "blocks": view.get("blocks", []),
                "state": {"values": state},
                "app_id": self.api_app_id,
            },
            "response_urls": [],
            "is_enterprise_install": False,
        }
        return await self.interaction(payload)
