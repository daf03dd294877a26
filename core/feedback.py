"""Feedback on answers: the buttons' identity, the check that a click is real, storing it.

Every platform rates the same thing: the stored assistant message of an answer (its id is the
reply's ``TurnResult.reply_id``). The front door offers the buttons once an answer is stored,
on the last message of the reply, through the surface's ``FeedbackSurface.offer_feedback``
(Slack: a ``chat.update`` adding a ``context_actions`` block; Discord: an edit adding a view),
paced by the same budgets as the reply's edits (``core.bot.FrontDoor``, which owns pacing). Streaming states never carry buttons, and the
text of every message stays exactly what the streamer showed.

A click names its answer in the button (``feedback_id``: ``good:123`` / ``bad:123``). A button's
value can be forged, the message a platform says was clicked cannot (Slack signs the request,
Discord's gateway delivers the interaction): a click counts only when it came from one of the
platform messages that show the answer it names (``Feedback.record``).

Clicks are stored append-only; each user's latest click on an answer counts
(``ConversationStore.latest_feedback``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from core.conversation import ConversationKey
    from core.metrics import Metrics
    from core.ratelimit import RateScope
    from core.store import ConversationStore, RatedReply

log = logging.getLogger(__name__)

GOOD, BAD = 1, -1
#: The words a value goes by: in button ids, metrics and what users read.
VALUE_NAMES = {GOOD: "good", BAD: "bad"}
_FEEDBACK_ID = re.compile(r"(?P<value>good|bad):(?P<reply>\d{1,19})")
#: The longest reason kept (a modal's text input takes up to 4,000 characters).
MAX_REASON_CHARS = 1000


def feedback_id(value: int, reply_id: int) -> str:
    """What a button carries: its value and the answer it rates, e.g. ``bad:123``."""
    return f"{VALUE_NAMES[value]}:{reply_id}"


def parse_feedback_id(text: str) -> tuple[int, int] | None:
    """``(value, reply id)`` of a ``feedback_id``, None when it is not one."""
    match = _FEEDBACK_ID.fullmatch(text.strip())
    if match is None:
        return None
    value = GOOD if match["value"] == "good" else BAD
    return value, int(match["reply"])


@runtime_checkable
class FeedbackSurface(Protocol):
    """A reply surface that can show feedback buttons under a finished answer."""

    def scopes(self, call: str) -> tuple[RateScope, ...]: ...

    async def offer_feedback(self, reply_id: int, message_id: str, shown: str) -> None:
        """Add thumbs up and down for answer ``reply_id`` to message ``message_id``, the
        reply's last, which shows ``shown`` (rendered); its text must stay exactly that.
        Costs one ``"edit"`` call; raises the core surface errors."""
        ...


@dataclass(frozen=True, slots=True)
class Click:
    """One click (or a reason given after one): who, which answer, from which platform message
    (``message``: its id as the reply stores it), +1 or -1, the reason if any."""

    platform: str
    message: str
    user_id: str
    reply_id: int
    value: int
    reason: str | None = None


class Feedback:
    """Records clicks (see the module docstring); the front door offers the buttons."""

    def __init__(self, store: ConversationStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    async def record(self, click: Click) -> RatedReply | None:
        """Store ``click`` if it came from a message showing the answer it names; the answer,
        or None when the click does not count (forged, or the answer is gone)."""
        reply = await self.store.rated_reply(click.reply_id)
        if (
            reply is None
            or reply.platform != click.platform
            or click.message not in reply.platform_message_ids
        ):
            log.warning(
                "%s feedback of %s on answer %s from message %s refused: not that answer's",
                click.platform, click.user_id, click.reply_id, click.message,
            )  # fmt: skip
            return None
        await self._store(reply, click.user_id, click.value, click.reason)
        return reply

    async def rate_last(
        self, key: ConversationKey, user_id: str, value: int, reason: str | None = None
    ) -> RatedReply | None:
        """Rate the latest answer of the conversation at ``key`` (the terminal's ``/good``
        ``/bad``); None when it has none."""
        conversation = await self.store.find(key)
        if conversation is None:
            return None
        reply = await self.store.last_reply(conversation.id)
        if reply is not None:
            await self._store(reply, user_id, value, reason)
        return reply

    async def _store(self, reply: RatedReply, user_id: str, value: int, reason: str | None) -> None:
        reason = (reason or "").strip()[:MAX_REASON_CHARS] or None
        await self.store.add_feedback(reply, user_id, value, reason)
        self.metrics.feedback(reply.platform, VALUE_NAMES[value])
        log.info(
            "%s feedback of %s on answer %s: %s%s",
            reply.platform, user_id, reply.id, VALUE_NAMES[value], " (with a reason)" if reason else "",
        )  # fmt: skip
