"""OpenAI chat completions, streamed; also any compatible server (Ollama, vLLM, llama.cpp)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx2

from core.config import Settings
from core.conversation import ChatMessage, Usage, alternating
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
    import openai
    from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam

OPENAI_API_URL = "https://api.openai.com/v1"
#: Sent as the key to an OPENAI_BASE_URL server that needs none (Ollama, llama.cpp): the SDK
#: insists on some key, and those servers ignore it.
PLACEHOLDER_API_KEY = "not-needed"


@register
class OpenAIProvider(Provider):
    """Streams from ``/chat/completions`` with the official async SDK."""

    name = "openai"
    key_env_var = "OPENAI_API_KEY"
    # Fast, inexpensive and not a reasoning model, so tokens start flowing at once.
    default_model = "gpt-4.1-mini"

    def __init__(self, settings: Settings, *, client: openai.AsyncOpenAI | None = None) -> None:
        super().__init__(settings)
        self._sdk = SdkImport("openai")
        custom_url = settings.openai_base_url
        if settings.openai_api_key is None and custom_url is None:
            raise ConfigError(
                "OPENAI_API_KEY is not set: set it, or set OPENAI_BASE_URL for a local "
                "OpenAI-compatible server",
                setting="OPENAI_API_KEY",
            )
        self.endpoint = Endpoint(
            vendor="OpenAI" if custom_url is None else "the OpenAI-compatible server",
            base_url=custom_url or OPENAI_API_URL,
            base_url_setting="OPENAI_BASE_URL",
            base_url_is_custom=custom_url is not None,
            key_setting="OPENAI_API_KEY",
            model=self.model,
            timeout=settings.llm_timeout or None,
        )
        self._api_key = settings.openai_api_key or PLACEHOLDER_API_KEY
        self._client = client

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client, built on first use (after the SDK's import has finished)."""
        if self._client is None:
            sdk = self._sdk.module()
            # Everything is passed explicitly so the SDK never falls back to os.environ, and
            # max_retries=0 because core/retry.py is the one retry layer.
            self._client = sdk.AsyncOpenAI(
                api_key=self._api_key,
                base_url=self.endpoint.base_url,
                timeout=self.endpoint.timeout,
                max_retries=0,
            )
        return self._client

    def label_for(self, model: str) -> str:
        if self.endpoint.base_url_is_custom:
            return f"openai-compatible ({model} at {self.endpoint.base_url})"
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
        await self._sdk.ready()
        model = model or self.model
        endpoint = replace(self.endpoint, model=model)
        wire: list[ChatCompletionMessageParam] = []
        if system:
            wire.append({"role": "system", "content": system})
        # Roles alternate on the wire: local servers' chat templates often insist on it.
        for message in alternating(messages):
            if message.role == "user" and message.images:
                wire.append({"role": "user", "content": _with_images(message)})
            elif message.role == "user":
                wire.append({"role": "user", "content": message.content})
            else:
                wire.append({"role": "assistant", "content": message.content})
        with map_openai_exceptions(endpoint):
            if endpoint.base_url_is_custom:
                # Compatible servers all know max_tokens; not all know its successor.
                response = await self.client.chat.completions.create(
                    model=model,
                    messages=wire,
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            else:
                # OpenAI's reasoning models reject max_tokens; max_completion_tokens works
                # for every current OpenAI model.
                response = await self.client.chat.completions.create(
                    model=model,
                    messages=wire,
                    max_completion_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            async with response:
                async for chunk in response:
                    if chunk.usage is not None and usage is not None:
                        usage.input_tokens = chunk.usage.prompt_tokens
                        usage.output_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.index != 0:
                            continue
                        # OpenAI's words are the normalised ones ("stop", "length", ...).
                        if choice.finish_reason is not None and usage is not None:
                            usage.finish_reason = choice.finish_reason
                        # Empty strings are noise (the first chunk has content="").
                        if choice.delta is not None and choice.delta.content:
                            yield choice.delta.content

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


def _with_images(message: ChatMessage) -> list[ChatCompletionContentPartParam]:
    """A user message's text and images as content parts (images as base64 data URLs)."""
    parts: list[ChatCompletionContentPartParam] = [{"type": "text", "text": message.content}]
    for image in message.images:
        data = base64.b64encode(image.data).decode("ascii")
        parts.append(
            {"type": "image_url", "image_url": {"url": f"data:{image.media_type};base64,{data}"}}
        )
    return parts


@contextmanager
def map_openai_exceptions(endpoint: Endpoint) -> Iterator[None]:
    """Translate what the OpenAI SDK (and the transport under it) raises into our error tree.

    Used once the SDK is loaded (``OpenAIProvider.stream`` waits for it), so importing it here
    costs a dictionary lookup.
    """
    import openai

    try:
        yield
    except openai.APIStatusError as exc:
        raise api_failure_error(
            ApiFailure(
                status=exc.status_code,
                message=_api_message(exc),
                error_type=exc.type,
                code=exc.code,
                headers=exc.response.headers,
                details=_error_object(exc.body),
            ),
            endpoint,
        ) from exc
    except openai.APIConnectionError as exc:
        # Covers timeouts too (APITimeoutError is a subclass); the httpx2 error is the cause,
        # whether the connection failed at the start or dropped mid-stream.
        cause = exc.__cause__ if exc.__cause__ is not None else httpx2.TransportError(exc.message)
        raise transport_error(cause, endpoint) from exc
    except openai.APIResponseValidationError as exc:
        raise PermanentProviderError(
            f"{endpoint.vendor} sent a response the SDK could not read: {one_line(exc.message)}"
        ) from exc
    except openai.APIError as exc:
        # An ``{"error": ...}`` object inside a started stream.
        raise api_failure_error(
            ApiFailure(
                status=None,
                message=exc.message,
                error_type=exc.type,
                code=exc.code,
                details=_error_object(exc.body),
            ),
            endpoint,
        ) from exc
    except STREAM_TRANSPORT_ERRORS as exc:
        raise transport_error(exc, endpoint) from exc
    except MALFORMED_CHUNK_ERRORS as exc:
        raise malformed_chunk_error(exc, endpoint) from exc
    except openai.OpenAIError as exc:
        raise PermanentProviderError(
            f"{endpoint.vendor} request failed: {one_line(str(exc))}"
        ) from exc


def _api_message(exc: openai.APIStatusError) -> str:
    """The API's own ``error.message`` when the body has one, else the SDK's summary."""
    error = _error_object(exc.body)
    if error is not None and isinstance(error.get("message"), str):
        return str(error["message"])
    return exc.message


def _error_object(body: object) -> dict[str, object] | None:
    """The ``error`` object of an error body (the SDK hands over either the body or the object)."""
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    return error if isinstance(error, dict) else None


__all__ = ["OPENAI_API_URL", "PLACEHOLDER_API_KEY", "OpenAIProvider", "map_openai_exceptions"]
