"""The nouns every layer shares: who said what, in which conversation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from core.attachments import Attachment

Role = Literal["user", "assistant"]

#: ``Usage.finish_reason`` when the model ended its answer itself.
FINISH_STOP = "stop"
#: ``Usage.finish_reason`` when the answer was cut at ``max_tokens``.
FINISH_LENGTH = "length"


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
class ImagePart:
    """An image sent with a question to a model that sees images (never stored)."""

    name: str
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message as sent to a model; ``images`` go after the text (the turn's own question)."""

    role: Role
    content: str
    images: tuple[ImagePart, ...] = ()


@dataclass(slots=True)
class Usage:
    """Token usage a provider reports for one request, and why the answer ended.

    ``finish_reason`` is normalised across providers: ``"stop"`` (the model finished),
    ``"length"`` (cut at ``max_tokens``: OpenAI ``length``, Anthropic ``max_tokens``), or the
    provider's own word for anything else (``"content_filter"``, ``"refusal"``); ``None`` when the
    stream ended without saying (a dropped or stopped stream).
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None

    @property
    def cut_at_limit(self) -> bool:
        """Whether the answer was cut at ``max_tokens`` rather than finished."""
        return self.finish_reason == FINISH_LENGTH


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
    # The durable record of this question (``ConversationStore.open_turn``), when the front door
    # recorded one at intake: the engine stores the turn's progress and outcome on it.
    turn_id: int | None = None
    # Taken over from a worker that died: its question may be stored already.
    taken_over: bool = False
    # Images that came with the message (``core.attachments``): fetched when the turn runs and
    # sent to a model that sees images. Text files are inlined into ``text`` at intake.
    attachments: tuple[Attachment, ...] = ()


def alternating(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with consecutive messages of one role joined, so roles alternate.

    A failed turn leaves a user message without an answer, and a Slack thread's earlier messages
    are several people's in a row. The chat templates of many local models (served through
    OPENAI_BASE_URL: Mistral's, Llama 2's) reject such runs outright.
    """
    merged: list[ChatMessage] = []
    for message in messages:
        if merged and merged[-1].role == message.role:
            previous = merged[-1]
            merged[-1] = ChatMessage(
                message.role,
                f"{previous.content}\n\n{message.content}",
                previous.images + message.images,
            )
        else:
            merged.append(message)
    return merged
