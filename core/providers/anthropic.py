"""Anthropic messages API, streamed."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Literal, cast

import httpx2

from core.config import Settings
from core.conversation import FINISH_LENGTH, FINISH_STOP, ChatMessage, Usage
from core.errors import ConfigError, PermanentProviderError
from core.providers import register
from core.providers.base import Provider
from core.providers.failures import (
    MALFORMED_CHUNK_ERRORS,
    STREAM_TRANSPORT_ERRORS,
    ApiFailure,
    Endpoint,
    api_failure_error,
    malformed_chunk_error,
    one_line,
    transport_error,
)
from core.providers.sdk import SdkImport

if TYPE_CHECKING:
    # The SDK itself is imported when the provider is built (core/providers/sdk.py).
    import anthropic
    from anthropic.types import (
        Base64ImageSourceParam,
        ContentBlockParam,
        ImageBlockParam,
        MessageParam,
    )

ANTHROPIC_API_URL = "https://api.anthropic.com"
#: The image types the messages API takes.
ImageMediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
#: Sent as the key to an ANTHROPIC_BASE_URL server that needs none (a local gateway).
PLACEHOLDER_API_KEY = "not-needed"
#: Anthropic's ``stop_reason`` values in ``Usage.finish_reason``'s words; others pass through
#: (docs.anthropic.com "Handling stop reasons": a reply cut at the context window is cut too).
STOP_REASONS = {
    "end_turn": FINISH_STOP,
    "stop_sequence": FINISH_STOP,
    "max_tokens": FINISH_LENGTH,
    "model_context_window_exceeded": FINISH_LENGTH,
}


@register
class AnthropicProvider(Provider):
    """Streams from ``/v1/messages`` with the official async SDK."""

    name = "anthropic"
    key_env_var = "ANTHROPIC_API_KEY"
    # Anthropic's fastest current model: quick first tokens and low cost suit a team chat.
    default_model = "claude-haiku-4-5"

    def __init__(
        self, settings: Settings, *, client: anthropic.AsyncAnthropic | None = None
    ) -> None:
        super().__init__(settings)
        self._sdk = SdkImport("anthropic")
        custom_url = settings.anthropic_base_url
        if settings.anthropic_api_key is None and custom_url is None:
            raise ConfigError(
                "ANTHROPIC_API_KEY is not set: set it, or choose another LLM_PROVIDER",
                setting="ANTHROPIC_API_KEY",
            )
        self.endpoint = Endpoint(
            vendor="Anthropic",
            base_url=custom_url or ANTHROPIC_API_URL,
            base_url_setting="ANTHROPIC_BASE_URL",
            base_url_is_custom=custom_url is not None,
            key_setting="ANTHROPIC_API_KEY",
            model=self.model,
            timeout=settings.llm_timeout or None,
        )
        self._api_key = settings.anthropic_api_key or PLACEHOLDER_API_KEY
        self._client = client

    @property
    def client(self) -> anthropic.AsyncAnthropic:
        """The SDK client, built on first use (after the SDK's import has finished)."""
        if self._client is None:
            sdk = self._sdk.module()
            # An explicit api_key keeps the SDK from reading credentials from os.environ or its
            # profile files; max_retries=0 because core/retry.py is the one retry layer.
            self._client = sdk.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self.endpoint.base_url,
                timeout=self.endpoint.timeout,
                max_retries=0,
            )
        return self._client

    def label_for(self, model: str) -> str:
        if self.endpoint.base_url_is_custom:
            return f"anthropic ({model} at {self.endpoint.base_url})"
        return super().label_for(model)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        system: str,
        max_tokens: int,
        usage: Usage | None = None,
        model: str | None = None,
    ) -> AsyncIterator[str]:
        sdk = await self._sdk.ready()
        model = model or self.model
        endpoint = replace(self.endpoint, model=model)
        wire: list[MessageParam] = []
        for message in messages:
            if message.role == "user" and message.images:
                wire.append({"role": "user", "content": _with_images(message)})
            elif message.role == "user":
                wire.append({"role": "user", "content": message.content})
            else:
                wire.append({"role": "assistant", "content": message.content})
        with map_anthropic_exceptions(endpoint):
            response = await self.client.messages.create(
                model=model,
                max_tokens=max_tokens,
                messages=wire,
                # The API rejects an empty system text block; no prompt means no field.
                system=system if system else sdk.omit,
                stream=True,
            )
            async with response:
                async for event in response:
                    if event.type == "content_block_delta":
                        if event.delta.type == "text_delta" and event.delta.text:
                            yield event.delta.text
                    elif event.type == "message_start" and usage is not None:
                        start = event.message.usage
                        usage.input_tokens = (
                            start.input_tokens
                            + (start.cache_creation_input_tokens or 0)
                            + (start.cache_read_input_tokens or 0)
                        )
                        usage.output_tokens = start.output_tokens
                    elif event.type == "message_delta" and usage is not None:
                        # Counts in message_delta are cumulative, so they replace, not add.
                        usage.output_tokens = event.usage.output_tokens
                        reason = event.delta.stop_reason
                        if reason is not None:
                            usage.finish_reason = STOP_REASONS.get(reason, reason)
                        if event.usage.input_tokens is not None:
                            usage.input_tokens = (
                                event.usage.input_tokens
                                + (event.usage.cache_creation_input_tokens or 0)
                                + (event.usage.cache_read_input_tokens or 0)
                            )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


def _with_images(message: ChatMessage) -> list[ContentBlockParam]:
    """A user message's images as base64 image blocks, then its text (Anthropic advises images
    before the question)."""
    blocks: list[ContentBlockParam] = []
    for image in message.images:
        source: Base64ImageSourceParam = {
            "type": "base64",
            # core/attachments.py sends only the four types the API takes.
            "media_type": cast(ImageMediaType, image.media_type),
            "data": base64.b64encode(image.data).decode("ascii"),
        }
        block: ImageBlockParam = {"type": "image", "source": source}
        blocks.append(block)
    blocks.append({"type": "text", "text": message.content})
    return blocks


@contextmanager
def map_anthropic_exceptions(endpoint: Endpoint) -> Iterator[None]:
    """Translate what the Anthropic SDK (and the transport under it) raises into our errors.

    The SDK turns an ``event: error`` inside a 200 stream into an ``APIStatusError`` whose
    status is the stream's (200): the error's ``type`` (``overloaded_error``) decides then. It
    lets transport errors raised while reading the stream through untranslated. Used once the
    SDK is loaded (``AnthropicProvider.stream`` waits for it), so importing it here is a lookup.
    """
    import anthropic

    try:
        yield
    except anthropic.APIStatusError as exc:
        raise api_failure_error(
            ApiFailure(
                status=exc.status_code,
                message=exc.api_message or exc.message,
                error_type=exc.type,
                code=exc.error_code,
                headers=exc.response.headers,
                details=_error_object(exc.body),
            ),
            endpoint,
        ) from exc
    except anthropic.APIConnectionError as exc:
        # Covers timeouts too (APITimeoutError is a subclass); the httpx2 error is the cause.
        cause = exc.__cause__ if exc.__cause__ is not None else httpx2.TransportError(exc.message)
        raise transport_error(cause, endpoint) from exc
    except STREAM_TRANSPORT_ERRORS as exc:
        raise transport_error(exc, endpoint) from exc
    except MALFORMED_CHUNK_ERRORS as exc:
        raise malformed_chunk_error(exc, endpoint) from exc
    except anthropic.AnthropicError as exc:
        raise PermanentProviderError(
            f"{endpoint.vendor} request failed: {one_line(str(exc))}"
        ) from exc


def _error_object(body: object) -> dict[str, object] | None:
    """The ``error`` object of an Anthropic error body, when there is one."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    return error if isinstance(error, dict) else None


__all__ = [
    "ANTHROPIC_API_URL",
    "PLACEHOLDER_API_KEY",
    "STOP_REASONS",
    "AnthropicProvider",
    "map_anthropic_exceptions",
]
