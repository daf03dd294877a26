"""The nouns every layer shares: who said what, in which conversation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Where a conversation lives on its platform.

    ``thread`` is the thread's id (Slack thread_ts, Discord thread channel id), or ``""`` for a
    conversation that is the whole channel (a DM, a terminal session).
    """

    platform: str
    workspace: str
    channel: str
    thread: str = ""

    def __str__(self) -> str:
        return f"{self.platform}:{self.workspace}:{self.channel}:{self.thread or '-'}"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message as sent to a model."""

    role: Role
    content: str


@dataclass(slots=True)
class Usage:
    """Token usage a provider reports for one request; filled in while streaming."""

    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A user's message as an adapter hands it to the engine.

    ``message_id`` is the platform's own identity of the message (Slack ``channel:ts``, Discord
    message id): the engine records it once, so a second delivery is dropped. ``None`` means the
    platform has no such identity (the terminal).
    """

    key: ConversationKey
    text: str
    user_id: str
    message_id: str | None = None
    # Earlier messages of the thread, oldest first, used to seed a new conversation when the bot
    # is first mentioned inside an existing thread.
    thread_context: tuple[ChatMessage, ...] = field(default_factory=tuple)
    # Commands typed as words (``@bot reset``) are recognised only where the adapter allows it.
    allow_commands: bool = True
