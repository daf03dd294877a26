"""The offline provider: scripted answers for tests, a deterministic demo when no key is set."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from core.config import Settings
from core.conversation import FINISH_STOP, ChatMessage, Usage
from core.providers import register
from core.providers.base import Provider
from core.tokens import estimate_tokens

OFFLINE_NOTICE = "offline demo: no LLM API key is set, so these answers are scripted, not a model's"

#: One scripted answer: text chunks, with an exception instance wherever the stream should fail.
Script = Sequence[str | BaseException]


@dataclass(frozen=True, slots=True)
class OfflineRequest:
    """What the offline provider was asked, kept for tests."""

    messages: tuple[ChatMessage, ...]
    system: str
    max_tokens: int
    model: str = ""


@register
class OfflineProvider(Provider):
    """Streams scripted chunks (``enqueue``) or, with nothing queued, a deterministic demo answer.

    Each chunk is delayed by ``OFFLINE_DELAY`` seconds so the demo streams at a realistic pace.
    """

    name = "offline"
    default_model = "scripted"
    is_offline = True

    def __init__(
        self,
        settings: Settings,
        *,
        delay: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings)
        self.delay = settings.offline_delay if delay is None else delay
        self.requests: list[OfflineRequest] = []
        #: When the last chunk of the answer to each question (the last message) went out, for
        #: benchmarks that measure how long a platform takes to show the final text.
        self.last_token_at: dict[str, float] = {}
        self._clock = clock
        self._scripts: deque[Script] = deque()

    def label_for(self, model: str) -> str:
        if model == self.model:
            return "offline (scripted demo answers, no model)"
        return f"offline ({model}: scripted demo answers, no model)"

    def enqueue(self, *scripts: Script) -> None:
        """Queue answers; each is streamed by one later request, in order."""
        self._scripts.extend(scripts)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        system: str,
        max_tokens: int,
        usage: Usage | None = None,
        model: str | None = None,
    ) -> AsyncIterator[str]:
        self.requests.append(
            OfflineRequest(tuple(messages), system, max_tokens, model or self.model)
        )
        script = self._scripts.popleft() if self._scripts else demo_answer(messages)
        produced: list[str] = []
        for item in script:
            if isinstance(item, BaseException):
                raise item
            if self.delay:
                await asyncio.sleep(self.delay)
            if item:
                produced.append(item)
                yield item
                if messages:
                    self.last_token_at[messages[-1].content] = self._clock()
        if usage is not None:
            usage.input_tokens = sum(estimate_tokens(m.content) for m in messages)
            usage.input_tokens += estimate_tokens(system)
            usage.output_tokens = estimate_tokens("".join(produced))
            usage.finish_reason = FINISH_STOP


def demo_answer(messages: Sequence[ChatMessage]) -> list[str]:
    """A deterministic answer that shows the conversation is remembered, split into words."""
    last = messages[-1].content if messages else ""
    earlier = sum(1 for m in messages[:-1] if m.role == "user")
    quoted = " ".join(last.split())
    if len(quoted) > 200:
        quoted = quoted[:200] + "…"
    text = (
        f"*({OFFLINE_NOTICE}.)*\n\n"
        f"You said: “{quoted}”.\n\n"
        f"I can see {earlier} earlier message{'s' if earlier != 1 else ''} of yours in this "
        "conversation. Set `OPENAI_API_KEY` (or `OPENAI_BASE_URL` for a local server such as "
        "Ollama) or `ANTHROPIC_API_KEY` to talk to a real model."
    )
    # Keep the spaces attached to the words so the chunks join back to the exact text.
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


__all__ = ["OFFLINE_NOTICE", "OfflineProvider", "OfflineRequest", "Script", "demo_answer"]
