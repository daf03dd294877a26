"""The Provider seam: one class per language-model API, one method that streams text."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from core.config import Settings
from core.conversation import ChatMessage, Usage


class Provider(ABC):
    """A language model that streams an answer.

    Contract of ``stream``: yield the answer's text deltas as they arrive (never empty strings);
    fill in ``usage`` when the server reports token counts; raise ``TransientProviderError`` (with
    the server's ``retry_after`` when it gave one) for rate limits, 5xx, overload, timeouts and
    dropped connections, and ``PermanentProviderError`` (``ProviderAuthError`` for refused keys)
    for everything else. ``model`` names the model to ask (None: ``self.model``, the deployment's
    ``LLM_MODEL``): one provider serves every ``MODELS`` entry of its API. A message's
    ``images`` are sent as the API's image parts. SDK exceptions never escape. Providers do not retry: SDK clients are
    built with ``max_retries=0`` and ``core/retry.py`` is the one retry layer.
    """

    #: Short name used by ``LLM_PROVIDER``.
    name: ClassVar[str]
    #: The environment variable holding the key, if the provider needs one.
    key_env_var: ClassVar[str | None] = None
    #: Model used when ``LLM_MODEL`` is not set.
    default_model: ClassVar[str]
    #: Whether a label telling users the answers are not from a real model should be shown.
    is_offline: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model = settings.llm_model or self.default_model

    @property
    def label(self) -> str:
        """What to call this provider and model when telling users or operators."""
        return self.label_for(self.model)

    def label_for(self, model: str) -> str:
        """What to call this provider answering with ``model``."""
        return f"{self.name} ({model})"

    @abstractmethod
    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        system: str,
        max_tokens: int,
        usage: Usage | None = None,
        model: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream the answer to ``messages`` after the ``system`` prompt, as text deltas."""

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        system: str,
        max_tokens: int,
        usage: Usage | None = None,
        model: str | None = None,
    ) -> str:
        """The whole answer at once (summaries); built on ``stream``.

        Check ``usage.finish_reason``: an answer cut at ``max_tokens`` is returned as far as it
        got.
        """
        parts = [
            delta
            async for delta in self.stream(
                messages, system=system, max_tokens=max_tokens, usage=usage, model=model
            )
        ]
        return "".join(parts)

    async def aclose(self) -> None:  # noqa: B027 (optional hook, nothing to release by default)
        """Release network resources."""
