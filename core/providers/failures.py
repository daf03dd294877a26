"""How the HTTP providers classify a failed request: what both SDK boundaries share.

Each provider module catches its own SDK's exceptions (``map_openai_exceptions``,
``map_anthropic_exceptions``) and describes them as an ``ApiFailure`` or a transport failure;
the functions here turn that into our error tree with a one-line message that names the
setting an operator would change.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio
import httpx2

from core.errors import (
    ContextOverflowError,
    ImagesRefusedError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)

#: Longest Retry-After we pass on, in seconds. Both SDKs ignore a header above 60 s
#: (``_calculate_retry_timeout`` in their ``_base_client.py``); a longer wait is clamped rather
#: than dropped so the retry layer still knows the server asked for a pause.
MAX_RETRY_AFTER_SECONDS = 60.0

#: Statuses below 500 worth retrying, as the SDKs' own ``_should_retry`` lists them: request
#: timeout, lock conflict, rate limit. Every status from 500 up is retried too (including
#: Anthropic's 529 overloaded).
TRANSIENT_STATUSES = frozenset({408, 409, 429})

#: Error ``type`` values that mean "the server failed, try again" when they arrive inside a
#: stream that has already started (HTTP status 200), from either API.
TRANSIENT_ERROR_TYPES = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "server_error", "timeout_error"}
)

#: Errors the httpx2 transport raises while a streamed body is being read (a dropped or reset
#: connection, a read timeout); the Anthropic SDK lets these through its stream iterator.
STREAM_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx2.TransportError,
    anyio.EndOfStream,
    anyio.BrokenResourceError,
)

#: A chunk whose data line is not JSON: the SDKs raise ``json.JSONDecodeError`` mid-stream.
MALFORMED_CHUNK_ERRORS: tuple[type[BaseException], ...] = (json.JSONDecodeError,)

#: How each server says a request exceeds the context window (matched lower-cased against the
#: error's code, type and message): OpenAI's ``context_length_exceeded`` code ("This model's
#: maximum context length is N tokens ..."), vLLM's same sentence, Anthropic's "prompt is too
#: long: N tokens > M maximum" and "input length and `max_tokens` exceed context limit",
#: llama.cpp's ``exceed_context_size_error`` ("request (3031 tokens) exceeds the available
#: context size (2048 tokens), try increasing it", with ``n_prompt_tokens`` and ``n_ctx``).
#: What servers say when the model cannot take the request's images: llama.cpp's llama-server
#: without a vision projector (HTTP 500, seen with SmolLM2 here), OpenAI for a model without
#: vision (HTTP 400), vLLM for a text-only model, and the wording several others share.
IMAGES_REFUSED_MARKERS = (
    "image input is not supported",
    "image_url is only supported by certain models",
    "is not a multimodal model",
    "does not support image",
)
CONTEXT_OVERFLOW_MARKERS = (
    "context_length_exceeded",
    "exceed_context_size_error",
    "maximum context length",
    "prompt is too long",
    "exceed context limit",
    "exceeds the available context size",
)
#: Statuses a context overflow arrives with: 400 from every API (413 is Anthropic's
#: request_too_large, about bytes rather than tokens, so it is left out); an error inside a
#: started stream has the stream's status (200, Anthropic) or None (OpenAI).
CONTEXT_OVERFLOW_STATUSES = frozenset({400, 200, None})
#: The context size, as the messages state it (first match wins).
_LIMIT_PATTERNS = (
    re.compile(r"maximum context length is ([\d,]+) tokens"),
    re.compile(r"limit of ([\d,]+) tokens"),
    re.compile(r"> ([\d,]+) maximum"),
    re.compile(r"exceed context limit: [\d,]+ \+ [\d,]+ > ([\d,]+)"),
    re.compile(r"available context size \(([\d,]+) tokens\)"),
)
#: What the request came to, as the messages state it.
_REQUESTED_PATTERNS = (
    re.compile(r"resulted in ([\d,]+) tokens"),
    re.compile(r"you requested ([\d,]+) tokens"),
    re.compile(r"too long: ([\d,]+) tokens"),
    re.compile(r"request \(([\d,]+) tokens\) exceeds"),
)
#: Fields of llama.cpp's error object: the context size and the prompt's tokens.
LLAMA_CPP_CONTEXT_FIELD = "n_ctx"
LLAMA_CPP_PROMPT_FIELD = "n_prompt_tokens"

# Longest API error message quoted in one of our one-line errors.
_MAX_QUOTED_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Who we were talking to, for messages that tell an operator what to change."""

    vendor: str  # "OpenAI", "Anthropic"
    base_url: str
    base_url_setting: str  # "OPENAI_BASE_URL"
    base_url_is_custom: bool
    key_setting: str  # "OPENAI_API_KEY"
    model: str
    timeout: float | None


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """An error the API itself reported: an HTTP status, or an error event inside a stream.

    ``status`` is the HTTP status; an error reported inside a started stream has the stream's
    status (200) or ``None``.
    """

    status: int | None
    message: str
    error_type: str | None = None
    code: str | None = None
    headers: Mapping[str, str] | None = None
    #: The error object itself, for fields beyond message/type/code (llama.cpp's ``n_ctx``).
    details: Mapping[str, object] | None = None


def retry_after_seconds(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """The server's Retry-After advice in seconds, or ``None`` when absent or nonsense.

    Reads ``retry-after-ms`` (OpenAI and Anthropic send it) first, then ``retry-after`` as
    seconds or an HTTP date; clamps to ``[0, MAX_RETRY_AFTER_SECONDS]``.
    """
    if not headers:
        return None
    seconds: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        seconds = _finite(raw_ms)
        if seconds is not None:
            seconds /= 1000
    if seconds is None:
        raw = headers.get("retry-after")
        if raw is None:
            return None
        seconds = _finite(raw)
        if seconds is None:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                return None
            seconds = when.timestamp() - now()
    if seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def _finite(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def one_line(text: str) -> str:
    """``text`` on one line, shortened: API messages can be long or span lines."""
    flat = " ".join(text.split())
    if len(flat) > _MAX_QUOTED_MESSAGE:
        flat = flat[: _MAX_QUOTED_MESSAGE - 1] + "…"
    return flat


def is_context_overflow(failure: ApiFailure) -> bool:
    """Whether ``failure`` says the request exceeds the model's context window."""
    if failure.status not in CONTEXT_OVERFLOW_STATUSES:
        return False
    said = " ".join(
        part.lower() for part in (failure.code, failure.error_type, failure.message) if part
    )
    return any(marker in said for marker in CONTEXT_OVERFLOW_MARKERS)


def context_overflow_error(failure: ApiFailure, endpoint: Endpoint) -> ContextOverflowError:
    """Our error for a context overflow, with the sizes the server stated."""
    details = failure.details or {}
    message = failure.message.lower()
    limit = _int_field(details, LLAMA_CPP_CONTEXT_FIELD) or _first_number(_LIMIT_PATTERNS, message)
    requested = _int_field(details, LLAMA_CPP_PROMPT_FIELD) or _first_number(
        _REQUESTED_PATTERNS, message
    )
    sizes = ""
    if requested is not None and limit is not None:
        sizes = f" ({requested:,} tokens for a {limit:,}-token context)"
    elif limit is not None:
        sizes = f" (a {limit:,}-token context)"
    return ContextOverflowError(
        f"{endpoint.vendor} says the request is too long for {endpoint.model!r}{sizes}: "
        f"{one_line(failure.message)}",
        limit=limit,
        requested=requested,
        status=failure.status,
    )


def _int_field(details: Mapping[str, object], name: str) -> int | None:
    value = details.get(name)
    # bool is an int too; a flag is not a size.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _first_number(patterns: tuple[re.Pattern[str], ...], text: str) -> int | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return int(match.group(1).replace(",", ""))
    return None


def refuses_images(failure: ApiFailure) -> bool:
    """Whether ``failure`` says the model cannot take the request's images."""
    said = failure.message.lower()
    return any(marker in said for marker in IMAGES_REFUSED_MARKERS)


def api_failure_error(failure: ApiFailure, endpoint: Endpoint) -> ProviderError:
    """Our error for a failure the API reported."""
    vendor, status = endpoint.vendor, failure.status
    said = one_line(failure.message)
    if is_context_overflow(failure):
        return context_overflow_error(failure, endpoint)
    if status is not None and status >= 400 and refuses_images(failure):
        # Before the 5xx rule: llama.cpp says it with a 500, and retrying cannot help.
        return ImagesRefusedError(
            f"{vendor} says {endpoint.model!r} cannot take images (HTTP {status}): {said}",
            status=status,
        )
    if status is None or status < 400:
        # An error event inside a stream the server had accepted: the server's own failure,
        # unless it names a fault of the request.
        if failure.error_type is None or failure.error_type in TRANSIENT_ERROR_TYPES:
            return TransientProviderError(
                f"{vendor} reported an error mid-answer: {said}", status=status
            )
        return PermanentProviderError(f"{vendor} stopped the answer: {said}", status=status)
    if status in (401, 403):
        refused = "refused the API key" if status == 401 else "does not allow this key"
        return ProviderAuthError(
            f"{vendor} {refused} (HTTP {status}): set {endpoint.key_setting} to a valid key",
            setting=endpoint.key_setting,
            status=status,
        )
    if status == 404:
        hint = "set LLM_MODEL (or its MODELS entry) to a model it serves"
        if endpoint.base_url_is_custom:
            hint += f", and check {endpoint.base_url_setting}={endpoint.base_url}"
        return PermanentProviderError(
            f"{vendor} has no model {endpoint.model!r} (HTTP 404: {said}): {hint}", status=404
        )
    if status == 429 and failure.code == "insufficient_quota":
        # OpenAI answers 429 for an exhausted quota too; waiting does not refill it.
        return PermanentProviderError(
            f"{vendor} says the account behind {endpoint.key_setting} is out of quota: {said}",
            status=429,
        )
    if status in TRANSIENT_STATUSES or status >= 500:
        what = {429: "is rate limiting us", 529: "is overloaded"}.get(status, "had an error")
        return TransientProviderError(
            f"{vendor} {what} (HTTP {status}): {said}",
            retry_after=retry_after_seconds(failure.headers),
            status=status,
        )
    return PermanentProviderError(
        f"{vendor} rejected the request (HTTP {status}): {said}", status=status
    )


def transport_error(exc: BaseException, endpoint: Endpoint) -> TransientProviderError:
    """Our error for a network failure: ``exc`` is the httpx2 (or anyio) exception itself."""
    vendor = endpoint.vendor
    if isinstance(exc, httpx2.TimeoutException):
        limit = f"{endpoint.timeout:g} s" if endpoint.timeout else "the time allowed"
        return TransientProviderError(
            f"{vendor} did not answer within {limit} (LLM_TIMEOUT) at {endpoint.base_url}",
            reason="timeout",
        )
    if isinstance(exc, httpx2.ConnectError):
        return TransientProviderError(
            f"cannot connect to {vendor} at {endpoint.base_url} ({one_line(str(exc)) or 'refused'}):"
            f" check {endpoint.base_url_setting} and that the server is running",
            reason="connection",
        )
    reason = one_line(str(exc)) or type(exc).__name__
    return TransientProviderError(
        f"the connection to {vendor} dropped before the answer was complete: {reason}",
        reason="connection",
    )


def malformed_chunk_error(exc: BaseException, endpoint: Endpoint) -> TransientProviderError:
    """Our error for a streamed chunk that was not valid JSON."""
    return TransientProviderError(
        f"{endpoint.vendor} sent a malformed stream chunk ({one_line(str(exc))})"
    )


__all__ = [
    "CONTEXT_OVERFLOW_MARKERS",
    "MALFORMED_CHUNK_ERRORS",
    "MAX_RETRY_AFTER_SECONDS",
    "STREAM_TRANSPORT_ERRORS",
    "TRANSIENT_ERROR_TYPES",
    "TRANSIENT_STATUSES",
    "ApiFailure",
    "Endpoint",
    "api_failure_error",
    "context_overflow_error",
    "is_context_overflow",
    "malformed_chunk_error",
    "one_line",
    "retry_after_seconds",
    "transport_error",
]
