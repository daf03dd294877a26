"""Feedback on answers: the buttons' identity, the check that a click is real, storing it.

Every platform rates the same thing: the stored assistant message of an answer (its id is the
reply's ``TurnResult.reply_id``). The front door offers the buttons once an answer is stored,
on the last message of the reply, through the surface's ``FeedbackSurface.offer_feedback``
(Slack: a ``chat.update`` adding a ``context_actions`` block; Discord: an edit adding a view),
paced by the same budgets as the reply's edits. Streaming states never carry buttons, and the
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

from core.errors import PermanentSurfaceError, SurfaceError, SurfaceRateLimited

if TYPE_CHECKING:
    from core.conversation import ConversationKey
    from core.metrics import Metrics
    from core.ratelimit import Budgets, RateScope
    from core.store import ConversationStore, RatedReply

log = logging.getLogger(__name__)

GOOD, BAD = 1, -1
#: The words a value goes by: in button ids, metrics and what users read.
VALUE_NAMES = {GOOD: "good", BAD: "bad"}
_FEEDBACK_ID = re.compile(r"(?P<value>good|bad):(?P<reply>\d{1,19})")
#: Attempts to add the buttons to a reply (each waits for the scope's budget first).
OFFER_ATTEMPTS = 3
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
    """Offers the buttons under answers and records clicks (see the module docstring)."""

    def __init__(self, store: ConversationStore, metrics: Metrics, budgets: Budgets) -> None:
        self.store = store
        self.metrics = metrics
        self.budgets = budgets

    async def offer(self, surface: object, reply_id: int, last: tuple[str, str] | None) -> bool:
        """Add the buttons to the reply's last message ``(id, shown text)``; whether they are
        there. Best effort: an answer without buttons is still an answer."""
        if last is None or not isinstance(surface, FeedbackSurface):
            return False
        scopes = surface.scopes("edit")
        for attempt in range(1, OFFER_ATTEMPTS + 1):
            # A progress call: it leaves part of the burst for final texts people wait for.
            await self.budgets.acquire(scopes, progress=True)
            try:
                await surface.offer_feedback(reply_id, *last)
            except SurfaceRateLimited as error:
                for key in [error.scope] if error.scope else [scope.key for scope in scopes]:
                    self.budgets.pause(key, error.retry_after)
            except PermanentSurfaceError as error:
                log.warning("answer %s: no feedback buttons (%s)", reply_id, error)
                return False
            except SurfaceError as error:
                log.info("answer %s: feedback buttons, attempt %d: %s", reply_id, attempt, error)
            else:
                return True
        log.warning("answer %s: no feedback buttons after %d attempts", reply_id, OFFER_ATTEMPTS)
        return False

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
