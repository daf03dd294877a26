"""History policies: which stored messages are sent with the next request.

``policy_for(settings, channel)`` picks the strategy (``HISTORY_STRATEGY``, overridable per
channel). A policy's ``build`` is a pure function of the stored messages plus settings; ``load``
reads from the store only the rows ``build`` can use; ``after_turn`` does slow upkeep (the
summarising strategy folds old messages there) and is run by the engine in the background, so it
never delays or breaks a reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.config import Settings
from core.conversation import ChatMessage
from core.store import ChannelSettings, Conversation, StoredMessage
from core.tokens import MESSAGE_OVERHEAD_TOKENS, estimate_tokens

if TYPE_CHECKING:
    from core.providers.base import Provider
    from core.store import ConversationStore


@dataclass(frozen=True, slots=True)
class Window:
    """What one request sends: the system prompt (with any summary) and the messages."""

    system: str
    messages: list[ChatMessage]
    tokens: int
    summary_included: bool = False
    # Messages loaded but left out, oldest first (what a summary could fold).
    dropped: list[StoredMessage] = field(default_factory=list)


def _drop_leading_assistant(messages: Sequence[StoredMessage]) -> int:
    # Anthropic rejects a conversation that starts with the assistant.
    start = 0
    while start < len(messages) and messages[start].role == "assistant":
        start += 1
    return start


class HistoryPolicy:
    """Base of the strategies. Subclasses override ``fetch_limit`` and ``build``."""

    name = "base"

    def fetch_limit(self) -> int | None:
        """How many of the newest messages ``build`` may use (None: all of them)."""
        return None

    def build(
        self, messages: Sequence[StoredMessage], *, system: str, summary: str | None = None
    ) -> Window:
        raise NotImplementedError

    async def load(
        self, store: ConversationStore, conversation: Conversation, *, system: str
    ) -> Window:
        """Read the rows the window needs and build it."""
        messages = await store.history(
            conversation, limit=self.fetch_limit(), after_id=conversation.summary_upto_id
        )
        return self.build(messages, system=system, summary=conversation.summary)

    async def after_turn(
        self, store: ConversationStore, conversation: Conversation, provider: Provider
    ) -> None:
        """Upkeep after a completed turn (nothing, unless the strategy summarises)."""


class CountPolicy(HistoryPolicy):
    """The newest ``max_messages`` messages; the oldest are trimmed."""

    name = "count"

    def __init__(self, max_messages: int) -> None:
        self.max_messages = max_messages

    def fetch_limit(self) -> int | None:
        return self.max_messages

    def build(
        self, messages: Sequence[StoredMessage], *, system: str, summary: str | None = None
    ) -> Window:
        keep = list(messages[-self.max_messages :])
        start = _drop_leading_assistant(keep)
        dropped = list(messages[: len(messages) - len(keep)]) + keep[:start]
        chat = [m.as_chat() for m in keep[start:]]
        tokens = estimate_tokens(system) + sum(
            estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in chat
        )
        return Window(system=system, messages=chat, tokens=tokens, dropped=dropped)


def policy_for(settings: Settings, channel: ChannelSettings | None = None) -> HistoryPolicy:
    """The history policy for a conversation, from deployment settings and channel overrides."""
    channel = channel or ChannelSettings()
    max_messages = channel.max_history_messages or settings.max_history_messages
    return CountPolicy(max_messages)
