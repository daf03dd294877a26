"""A local server that speaks the OpenAI chat-completions and Anthropic messages wire formats.

The real SDKs (``AsyncOpenAI``, ``AsyncAnthropic``) are pointed at it through their ``base_url``
and cannot tell it from the real thing: the same paths, SSE event sequences, error bodies and
headers. Each request to ``/v1/chat/completions`` or ``/v1/messages`` takes the next scripted
``Reply`` from a FIFO queue (an answer, an HTTP error, a stream cut mid-way, a malformed chunk,
a mid-stream error event, slow tokens, an answer cut at ``max_tokens``, a context overflow); with
nothing queued it answers deterministically with an echo of the last user message
(``echo_answer``), so demos work without scripting. Like real servers it stops an answer at the
request's ``max_tokens`` (one chunk a token) with ``finish_reason: length`` (Anthropic
``stop_reason: max_tokens``), and with ``context_tokens`` set it refuses a prompt of more words
than that with each API's own context-overflow error. Every request is recorded (path, headers,
JSON body) for assertions.

Three ways to use it:

- in-process: ``async with FakeLLMServer() as server: server.enqueue(rate_limited(2)); ...``
  or the ``llm_server`` pytest fixture below;
- over HTTP: ``POST /_control/enqueue`` (one reply object or a list, as ``Reply.to_json``),
  ``GET /_control/requests``, ``POST /_control/reset``;
- as a process: ``python -m tests.wire.llm_server --port 0`` prints
  ``listening on http://127.0.0.1:PORT`` and serves until SIGINT / SIGTERM;
  ``LLMServerProcess`` wraps that for tests that drive ``threadbot chat`` in a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from aiohttp import web

OPENAI_CHAT_PATH = "/v1/chat/completions"
ANTHROPIC_MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"
CONTROL_PREFIX = "/_control"

#: Models listed by ``GET /v1/models``. Any model name is accepted by the chat endpoints (local
#: OpenAI-compatible servers serve whatever they have); ``unknown_model()`` scripts a 404.
LISTED_MODELS = ("gpt-4.1-mini", "claude-haiku-4-5", "fake-echo")

Api = Literal["openai", "anthropic"]
Kind = Literal["answer", "status", "cut", "malformed", "stream_error", "context_overflow"]
#: Who words a context-overflow error: the vendor's own API, or llama.cpp's llama-server.
OverflowStyle = Literal["vendor", "llama.cpp"]

# Error ``type`` per status, as each API names it (platform.openai.com/docs/guides/error-codes,
# docs.anthropic.com/en/api/errors).
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "requests",
}
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_STATUS_FOR_ANTHROPIC_TYPE = {v: k for k, v in _ANTHROPIC_ERROR_TYPES.items()}


@dataclass(frozen=True)
class Reply:
    """How the server answers one chat request. Build with the functions below.

    ``after`` counts text chunks sent before a ``cut``, ``malformed`` chunk or ``stream_error``.
    ``retry_after`` / ``retry_after_ms`` are sent verbatim as headers (seconds, or an HTTP date).
    """

    kind: Kind = "answer"
    text: str | None = None
    chunks: tuple[str, ...] | None = None
    delay: float = 0.0
    status: int = 200
    error_type: str | None = None
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    after: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    finish: str | None = None
    limit: int | None = None
    requested: int | None = None
    style: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``POST /_control/enqueue`` accepts."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        """Parse what ``to_json`` produced; unknown keys are an error, not silently ignored."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown reply fields: {sorted(unknown)}")
        values = dict(data)
        if values.get("chunks") is not None:
            values["chunks"] = tuple(values["chunks"])
        return cls(**values)


def answer(
    text: str | None = None,
    *,
    chunks: Sequence[str] | None = None,
    delay: float = 0.0,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    finish: str | None = None,
) -> Reply:
    """A normal answer: ``chunks`` as given, else ``text`` split into words, else the echo.

    ``finish`` is the OpenAI ``finish_reason`` to end with ("stop" unless the request's
    ``max_tokens`` cut it: "length"); Anthropic gets the matching ``stop_reason``.
    """
    return Reply(
        text=text,
        chunks=tuple(chunks) if chunks is not None else None,
        delay=delay,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        finish=finish,
    )


def cut_at_limit(text: str | None = None) -> Reply:
    """An answer that ends with ``finish_reason: length`` / ``stop_reason: max_tokens``."""
    return answer(text, finish=FINISH_LENGTH)


def context_overflow(
    limit: int = 2048, requested: int = 2100, *, style: OverflowStyle = "vendor"
) -> Reply:
    """HTTP 400: the prompt exceeds a ``limit``-token context, worded as the server words it.

    ``vendor``: OpenAI's ``context_length_exceeded`` ("maximum context length is N tokens") or
    Anthropic's "prompt is too long: N tokens > M maximum"; ``llama.cpp``: llama-server's
    ``exceed_context_size_error`` with ``n_prompt_tokens`` and ``n_ctx`` in the error object.
    """
    return Reply(kind="context_overflow", status=400, limit=limit, requested=requested, style=style)


def slow(delay: float, text: str | None = None) -> Reply:
    """An answer that waits ``delay`` seconds before each chunk."""
    return answer(text, delay=delay)


def http_error(
    status: int,
    *,
    error_type: str | None = None,
    message: str | None = None,
    code: str | None = None,
    retry_after: float | str | None = None,
    retry_after_ms: float | str | None = None,
) -> Reply:
    """An HTTP error with the API's own error body (400, 403, 500, 503, ...)."""
    return Reply(
        kind="status",
        status=status,
        error_type=error_type,
        message=message,
        code=code,
        retry_after=None if retry_after is None else _header_number(retry_after),
        retry_after_ms=None if retry_after_ms is None else _header_number(retry_after_ms),
    )


def rate_limited(
    retry_after: float | str | None = 1, *, retry_after_ms: float | str | None = None
) -> Reply:
    """429 with ``retry-after`` (and ``x-ratelimit-*`` / ``anthropic-ratelimit-*``) headers."""
    return http_error(429, retry_after=retry_after, retry_after_ms=retry_after_ms)


def server_error(status: int = 500) -> Reply:
    """A 5xx answer (500, 502, 503)."""
    return http_error(status)


def overloaded() -> Reply:
    """Anthropic's 529 ``overloaded_error``."""
    return http_error(529, error_type="overloaded_error", message="Overloaded")


def unauthorized() -> Reply:
    """401: the key was refused."""
    return http_error(401)


def unknown_model() -> Reply:
    """404: the requested model does not exist."""
    return http_error(404, code="model_not_found")


def bad_request(message: str = "Invalid request") -> Reply:
    """400 ``invalid_request_error``."""
    return http_error(400, message=message)


def cut(after: int = 2, text: str | None = None) -> Reply:
    """Send ``after`` text chunks, then close the connection abruptly (no [DONE], no stop)."""
    return Reply(kind="cut", after=after, text=text)


def malformed(after: int = 1, text: str | None = None) -> Reply:
    """Send ``after`` text chunks, then a data line that is not JSON, then the rest."""
    return Reply(kind="malformed", after=after, text=text)


def stream_error(
    after: int = 1, *, error_type: str = "overloaded_error", message: str = "Overloaded"
) -> Reply:
    """Send ``after`` text chunks, then an error inside the 200 stream.

    Anthropic: ``event: error`` with ``{"type": "error", "error": {...}}``; OpenAI: a data line
    ``{"error": {...}}``, as both APIs report failures after the stream has started.
    """
    return Reply(kind="stream_error", after=after, error_type=error_type, message=message)


#: OpenAI's finish_reason for a normal end and for an answer cut at max_tokens.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
#: Anthropic's stop_reason for each OpenAI finish_reason the fake sends.
_ANTHROPIC_STOP_REASONS = {FINISH_STOP: "end_turn", FINISH_LENGTH: "max_tokens"}


def _header_number(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def echo_answer(last_user_text: str) -> str:
    """The default answer: deterministic, derived from the request."""
    return f"You said: {last_user_text}"


def split_words(text: str) -> list[str]:
    """Split into word chunks that keep their spaces, so they join back to exactly ``text``."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def count_words(*texts: str) -> int:
    """The fake's token count: whitespace-separated words."""
    return sum(len(t.split()) for t in texts)


def _text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Prompt:
    """What a chat request asked, normalised across both APIs."""

    api: Api
    model: str
    stream: bool
    include_usage: bool
    system: str
    texts: tuple[str, ...]
    last_user: str
    max_tokens: int | None = None


def _openai_prompt(body: dict[str, Any]) -> _Prompt:
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    system = "\n".join(
        _text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
    )
    users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    options = body.get("stream_options") or {}
    return _Prompt(
        api="openai",
        model=str(body.get("model", "")),
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
        system=system,
        texts=tuple(
            _text_of(m.get("content"))
            for m in messages
            if m.get("role") not in ("system", "developer")
        ),
        last_user=users[-1] if users else "",
        max_tokens=_positive_int(body.get("max_completion_tokens", body.get("max_tokens"))),
    )


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _anthropic_prompt(body: dict[str, Any]) -> _Prompt:
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    users = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    return _Prompt(
        api="anthropic",
        model=str(body.get("model", "")),
        stream=bool(body.get("stream")),
        include_usage=True,
        system=_text_of(body.get("system", "")),
        texts=tuple(_text_of(m.get("content")) for m in messages),
        last_user=users[-1] if users else "",
        max_tokens=_positive_int(body.get("max_tokens")),
    )


class _StreamEnded(Exception):
    """Raised inside a handler once its response is over early (cut, or an in-stream error)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("stream ended early")
        self.response = response


class FakeLLMServer:
    """The fake API server. ``async with FakeLLMServer() as server`` starts it on a free port.

    ``api_key``: when set, requests must carry it (``Authorization: Bearer`` for OpenAI,
    ``x-api-key`` for Anthropic) or get the API's own 401. ``context_tokens``: when set, a prompt
    of more words than that (``count_words``, the fake's token count) is refused with the API's
    context-overflow error, as a real server with that context window would.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        context_tokens: int | None = None,
    ):
        self.host = host
        self.port = port
        self.api_key = api_key
        self.context_tokens = context_tokens
        self.requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> FakeLLMServer:
        """Listen on ``host:port`` (port 0 picks a free one, stored back in ``self.port``)."""
        app = web.Application()
        app.router.add_post(OPENAI_CHAT_PATH, self._chat_completions)
        app.router.add_post(ANTHROPIC_MESSAGES_PATH, self._messages)
        app.router.add_get(MODELS_PATH, self._models)
        app.router.add_post(f"{CONTROL_PREFIX}/enqueue", self._control_enqueue)
        app.router.add_get(f"{CONTROL_PREFIX}/requests", self._control_requests)
        app.router.add_post(f"{CONTROL_PREFIX}/reset", self._control_reset)
        # handler_cancellation: a client that hangs up (timeout tests) cancels its slow handler
        # instead of leaving it sleeping until shutdown.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Cancel answers still streaming, then close the listener."""
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLMServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- what tests use ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What ``OPENAI_BASE_URL`` should be (the SDK appends ``/chat/completions``)."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """What ``ANTHROPIC_BASE_URL`` should be (the SDK appends ``/v1/messages``)."""
        return self.url

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies; each chat request takes the next one, in order."""
        self._replies.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not yet used."""
        return len(self._replies)

    def chat_requests(self) -> list[RecordedRequest]:
        """Recorded requests to either chat endpoint, in arrival order."""
        return [r for r in self.requests if r.path in (OPENAI_CHAT_PATH, ANTHROPIC_MESSAGES_PATH)]

    def reset(self) -> None:
        """Forget queued replies and recorded requests."""
        self._replies.clear()
        self.requests.clear()

    # -- chat endpoints ---------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if not isinstance(body, dict):
            return self._error_response("openai", Reply(kind="status", status=400), "")
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return await self._answer(request, _openai_prompt(body), presented)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if not isinstance(body, dict):
            return self._error_response("anthropic", Reply(kind="status", status=400), "")
        # The API documents x-api-key; SDK 2.x sends the key as a bearer token. Accept both.
        presented = request.headers.get("x-api-key") or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        return await self._answer(request, _anthropic_prompt(body), presented)

    async def _answer(
        self, request: web.Request, prompt: _Prompt, presented_key: str
    ) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self.api_key is not None and presented_key != self.api_key:
                return self._error_response(prompt.api, unauthorized(), prompt.model)
            prompt_tokens = count_words(prompt.system, *prompt.texts)
            if self.context_tokens is not None and prompt_tokens > self.context_tokens:
                overflow = context_overflow(self.context_tokens, prompt_tokens)
                return self._error_response(prompt.api, overflow, prompt.model)
            reply = self._replies.popleft() if self._replies else answer()
            if reply.kind in ("status", "context_overflow"):
                return self._error_response(prompt.api, reply, prompt.model)
            if not prompt.stream:
                return await self._whole_answer(request, prompt, reply)
            if prompt.api == "openai":
                return await self._openai_stream(request, prompt, reply)
            return await self._anthropic_stream(request, prompt, reply)
        except _StreamEnded as ended:
            return ended.response
        except ConnectionResetError:
            # The client hung up (a timeout test); nobody is left to answer.
            return web.Response(status=499)
        finally:
            self._handlers.discard(task)

    def _chunks(self, prompt: _Prompt, reply: Reply) -> list[str]:
        if reply.chunks is not None:
            chunks = list(reply.chunks)
        else:
            chunks = split_words(
                reply.text if reply.text is not None else echo_answer(prompt.last_user)
            )
        # One chunk is one token: a real server stops at max_tokens.
        if prompt.max_tokens is not None:
            return chunks[: prompt.max_tokens]
        return chunks

    def _finish(self, prompt: _Prompt, reply: Reply) -> str:
        """OpenAI's finish_reason for ``reply``: as scripted, else "length" when cut."""
        if reply.finish is not None:
            return reply.finish
        if reply.chunks is not None:
            total = len(reply.chunks)
        else:
            total = len(
                split_words(reply.text if reply.text is not None else echo_answer(prompt.last_user))
            )
        cut = prompt.max_tokens is not None and total > prompt.max_tokens
        return FINISH_LENGTH if cut else FINISH_STOP

    def _usage(self, prompt: _Prompt, reply: Reply, chunks: list[str]) -> tuple[int, int]:
        input_tokens = reply.input_tokens
        if input_tokens is None:
            input_tokens = count_words(prompt.system, *prompt.texts)
        output_tokens = reply.output_tokens if reply.output_tokens is not None else len(chunks)
        return input_tokens, output_tokens

    async def _whole_answer(
        self, request: web.Request, prompt: _Prompt, reply: Reply
    ) -> web.StreamResponse:
        if reply.kind == "cut":
            self._cut(request, web.Response())
        if reply.kind == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        if reply.kind == "stream_error":
            status = _STATUS_FOR_ANTHROPIC_TYPE.get(reply.error_type or "", 500)
            return self._error_response(prompt.api, Reply(kind="status", status=status), "")
        chunks = self._chunks(prompt, reply)
        text = "".join(chunks)
        input_tokens, output_tokens = self._usage(prompt, reply, chunks)
        serial = next(self._ids)
        if prompt.api == "openai":
            return web.json_response(
                {
                    "id": f"chatcmpl-fake{serial}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": prompt.model,
                    "system_fingerprint": None,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": self._finish(prompt, reply),
                        }
                    ],
                    "usage": {
                        "prompt_tokens": input_tokens,
                        "completion_tokens": output_tokens,
                        "total_tokens": input_tokens + output_tokens,
                    },
                },
                headers={"x-request-id": f"req_fake{serial}"},
            )
        return web.json_response(
            {
                "id": f"msg_fake{serial}",
                "type": "message",
                "role": "assistant",
                "model": prompt.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": _anthropic_stop_reason(self._finish(prompt, reply)),
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            },
            headers={"request-id": f"req_fake{serial}"},
        )

    async def _start_stream(
        self, request: web.Request, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **headers,
            },
        )
        await response.prepare(request)
        return response

    async def _openai_stream(
        self, request: web.Request, prompt: _Prompt, reply: Reply
    ) -> web.StreamResponse:
        # The shape of api.openai.com's stream: a first chunk with the role and content "",
        # one chunk per delta, a chunk with finish_reason, a usage chunk with no choices when
        # stream_options.include_usage, then "data: [DONE]".
        serial = next(self._ids)
        chunks = self._chunks(prompt, reply)
        input_tokens, output_tokens = self._usage(prompt, reply, chunks)
        created = int(time.time())
        response = await self._start_stream(request, {"x-request-id": f"req_fake{serial}"})

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": f"chatcmpl-fake{serial}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": prompt.model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if prompt.include_usage:
                data["usage"] = None
            return data

        await self._send(
            response, _sse(chunk({"role": "assistant", "content": "", "refusal": None}))
        )
        for index, text in enumerate(chunks):
            if index == reply.after:
                await self._fault(request, response, prompt, reply)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            await self._send(response, _sse(chunk({"content": text})))
        if len(chunks) <= reply.after:
            await self._fault(request, response, prompt, reply)
        await self._send(response, _sse(chunk({}, finish=self._finish(prompt, reply))))
        if prompt.include_usage:
            final = chunk({})
            final["choices"] = []
            final["usage"] = {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            }
            await self._send(response, _sse(final))
        await self._send(response, b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _anthropic_stream(
        self, request: web.Request, prompt: _Prompt, reply: Reply
    ) -> web.StreamResponse:
        # The event sequence of docs.anthropic.com/en/docs/build-with-claude/streaming:
        # message_start (with input usage), content_block_start, ping, content_block_delta...,
        # content_block_stop, message_delta (cumulative output usage), message_stop.
        serial = next(self._ids)
        chunks = self._chunks(prompt, reply)
        input_tokens, output_tokens = self._usage(prompt, reply, chunks)
        response = await self._start_stream(request, {"request-id": f"req_fake{serial}"})
        start = {
            "type": "message_start",
            "message": {
                "id": f"msg_fake{serial}",
                "type": "message",
                "role": "assistant",
                "model": prompt.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }
        await self._send(response, _sse(start, event="message_start"))
        await self._send(
            response,
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                event="content_block_start",
            ),
        )
        await self._send(response, _sse({"type": "ping"}, event="ping"))
        for index, text in enumerate(chunks):
            if index == reply.after:
                await self._fault(request, response, prompt, reply)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            }
            await self._send(response, _sse(delta, event="content_block_delta"))
        if len(chunks) <= reply.after:
            await self._fault(request, response, prompt, reply)
        await self._send(
            response, _sse({"type": "content_block_stop", "index": 0}, event="content_block_stop")
        )
        message_delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": _anthropic_stop_reason(self._finish(prompt, reply)),
                "stop_sequence": None,
            },
            "usage": {"output_tokens": output_tokens},
        }
        await self._send(response, _sse(message_delta, event="message_delta"))
        await self._send(response, _sse({"type": "message_stop"}, event="message_stop"))
        await response.write_eof()
        return response

    async def _fault(
        self, request: web.Request, response: web.StreamResponse, prompt: _Prompt, reply: Reply
    ) -> None:
        """Inject ``reply``'s fault at the current point of a stream (no-op for answers)."""
        if reply.kind == "cut":
            self._cut(request, response)
        elif reply.kind == "malformed":
            event = "content_block_delta" if prompt.api == "anthropic" else None
            await self._send(response, _sse_raw('{"choices": [{"delta": {"content": "oops', event))
        elif reply.kind == "stream_error":
            error = {
                "type": reply.error_type or "overloaded_error",
                "message": reply.message or "Overloaded",
            }
            if prompt.api == "anthropic":
                await self._send(response, _sse({"type": "error", "error": error}, event="error"))
            else:
                await self._send(response, _sse({"error": {**error, "param": None, "code": None}}))
            # Both APIs end the response after an in-stream error.
            await response.write_eof()
            raise _StreamEnded(response)

    def _cut(self, request: web.Request, response: web.StreamResponse) -> None:
        """Close the socket without finishing the chunked body: the client sees a dropped stream."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise _StreamEnded(response)

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        await response.write(data)

    def _error_response(self, api: Api, reply: Reply, model: str) -> web.Response:
        if reply.kind == "context_overflow":
            return self._overflow_response(api, reply)
        status = reply.status
        serial = next(self._ids)
        headers: dict[str, str] = {}
        if reply.retry_after is not None:
            headers["retry-after"] = reply.retry_after
        if reply.retry_after_ms is not None:
            headers["retry-after-ms"] = reply.retry_after_ms
        if api == "openai":
            headers["x-request-id"] = f"req_fake{serial}"
            message, code = reply.message, reply.code
            if status == 401:
                message = (
                    message
                    or "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
                )
                code = code or "invalid_api_key"
            elif status == 404:
                message = (
                    message
                    or f"The model `{model}` does not exist or you do not have access to it."
                )
                code = code or "model_not_found"
            elif status == 429:
                message = message or "Rate limit reached for requests. Please try again later."
                code = code or "rate_limit_exceeded"
                reset = reply.retry_after or "1"
                headers.update(
                    {
                        "x-ratelimit-limit-requests": "500",
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": f"{reset}s",
                        "x-ratelimit-limit-tokens": "200000",
                        "x-ratelimit-remaining-tokens": "199000",
                        "x-ratelimit-reset-tokens": "6ms",
                    }
                )
            elif status >= 500:
                message = (
                    message
                    or "The server had an error while processing your request. Sorry about that!"
                )
            error_type = reply.error_type or _OPENAI_ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
            body: dict[str, Any] = {
                "error": {
                    "message": message or f"Error {status}",
                    "type": error_type,
                    "param": None,
                    "code": code,
                }
            }
        else:
            headers["request-id"] = f"req_fake{serial}"
            error_type = reply.error_type or _ANTHROPIC_ERROR_TYPES.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
            default_messages = {
                401: "invalid x-api-key",
                404: f"model: {model}",
                429: "Number of request tokens has exceeded your per-minute rate limit",
                529: "Overloaded",
            }
            message = reply.message or default_messages.get(status, "Internal server error")
            if status == 429:
                reset_at = datetime.now(UTC) + timedelta(seconds=1)
                headers.update(
                    {
                        "anthropic-ratelimit-requests-limit": "50",
                        "anthropic-ratelimit-requests-remaining": "0",
                        "anthropic-ratelimit-requests-reset": reset_at.isoformat(
                            timespec="seconds"
                        ),
                    }
                )
            body = {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": f"req_fake{serial}",
            }
        return web.json_response(body, status=status, headers=headers)

    def _overflow_response(self, api: Api, reply: Reply) -> web.Response:
        """A context overflow as each server words it (see ``context_overflow``)."""
        limit, requested = reply.limit or 0, reply.requested or 0
        serial = next(self._ids)
        if reply.style == "llama.cpp":
            # llama-server's body, as a real one sent it (tests/core/test_real_model.py).
            error: dict[str, Any] = {
                "code": 400,
                "message": (
                    f"request ({requested} tokens) exceeds the available context size "
                    f"({limit} tokens), try increasing it"
                ),
                "type": "exceed_context_size_error",
                "n_prompt_tokens": requested,
                "n_ctx": limit,
            }
            return web.json_response({"error": error}, status=400)
        if api == "openai":
            # platform.openai.com error codes: context_length_exceeded.
            message = (
                f"This model's maximum context length is {limit} tokens. However, your messages "
                f"resulted in {requested} tokens. Please reduce the length of the messages."
            )
            body: dict[str, Any] = {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            }
            return web.json_response(
                body, status=400, headers={"x-request-id": f"req_fake{serial}"}
            )
        body = {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": f"prompt is too long: {requested} tokens > {limit} maximum",
            },
            "request_id": f"req_fake{serial}",
        }
        return web.json_response(body, status=400, headers={"request-id": f"req_fake{serial}"})

    # -- other endpoints ------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if "anthropic-version" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": model,
                    "display_name": model,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for model in LISTED_MODELS
            ]
            return web.json_response(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"],
                    "last_id": data[-1]["id"],
                }
            )
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": 1_735_689_600, "owned_by": "fake"}
                    for model in LISTED_MODELS
                ],
            }
        )

    async def _control_enqueue(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
            items = payload if isinstance(payload, list) else [payload]
            replies = [Reply.from_json(item) for item in items]
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.enqueue(*replies)
        return web.json_response({"pending": self.pending})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.json_response([r.to_json() for r in self.requests])

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"pending": 0})

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        return body


def _anthropic_stop_reason(finish: str) -> str:
    return _ANTHROPIC_STOP_REASONS.get(finish, finish)


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    return _sse_raw(json.dumps(data, separators=(",", ":")), event)


def _sse_raw(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


# -- pytest ------------------------------------------------------------------------------------


@pytest.fixture
async def llm_server() -> AsyncIterator[FakeLLMServer]:
    """A running ``FakeLLMServer`` on a free loopback port, stopped after the test."""
    async with FakeLLMServer() as server:
        yield server


# -- as a separate process ------------------------------------------------------------------


@dataclass
class LLMServerProcess:
    """``python -m tests.wire.llm_server`` in a subprocess, driven over its control API.

    For tests that run the real ``threadbot chat`` process against it::

        with LLMServerProcess.start() as server:
            server.enqueue(rate_limited(1))
            env = {"OPENAI_BASE_URL": server.openai_base_url, ...}
    """

    process: subprocess.Popen[str]
    url: str
    _closed: bool = field(default=False, repr=False)

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, *, api_key: str | None = None, context_tokens: int | None = None
    ) -> Iterator[LLMServerProcess]:
        """Start the server on a free port and wait for its ``listening on`` line."""
        command = [sys.executable, "-m", "tests.wire.llm_server", "--port", "0"]
        if api_key is not None:
            command += ["--api-key", api_key]
        if context_tokens is not None:
            command += ["--context-tokens", str(context_tokens)]
        root = Path(__file__).resolve().parents[2]
        process = subprocess.Popen(
            command,
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("listening on "):
            process.kill()
            process.wait()
            raise RuntimeError(f"fake LLM server did not start: {line!r}")
        server = cls(process=process, url=line.removeprefix("listening on "))
        try:
            yield server
        finally:
            server.close()

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def enqueue(self, *replies: Reply) -> None:
        """Queue replies through ``POST /_control/enqueue``."""
        self._call("POST", "enqueue", [r.to_json() for r in replies])

    def requests(self) -> list[dict[str, Any]]:
        """Recorded requests (as ``RecordedRequest.to_json``) through ``GET /_control/requests``."""
        result: list[dict[str, Any]] = self._call("GET", "requests")
        return result

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def _call(self, method: str, name: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"{self.url}{CONTROL_PREFIX}/{name}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


async def _serve(host: str, port: int, api_key: str | None, context_tokens: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with FakeLLMServer(host, port, api_key=api_key, context_tokens=context_tokens) as server:
        print(f"listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.wire.llm_server",
        description="A fake OpenAI / Anthropic API server for tests and offline demos.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this key (else any key works)")
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help="refuse prompts of more words than this with a context-overflow error",
    )
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port, args.api_key, args.context_tokens))


if __name__ == "__main__":
    main()
