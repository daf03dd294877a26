"""The OpenAI and Anthropic providers, on the real SDKs, against the wire-level fake server."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from core.config import Settings
from core.conversation import ChatMessage, Usage
from core.errors import (
    ConfigError,
    ContextOverflowError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)
from core.providers import build_provider
from core.providers.anthropic import AnthropicProvider
from core.providers.base import Provider
from core.providers.failures import MAX_RETRY_AFTER_SECONDS, retry_after_seconds
from core.providers.openai import PLACEHOLDER_API_KEY, OpenAIProvider
from tests.wire.llm_server import (
    ANTHROPIC_MESSAGES_PATH,
    OPENAI_CHAT_PATH,
    FakeLLMServer,
    LLMServerProcess,
    Reply,
    answer,
    bad_request,
    context_overflow,
    count_words,
    cut,
    cut_at_limit,
    echo_answer,
    http_error,
    malformed,
    overloaded,
    rate_limited,
    server_error,
    slow,
    split_words,
    stream_error,
    unauthorized,
    unknown_model,
)

PROVIDERS = ("openai", "anthropic")
KEYS = {"openai": "sk-test-openai", "anthropic": "sk-ant-test"}
KEY_SETTINGS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
URL_SETTINGS = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
PATHS = {"openai": OPENAI_CHAT_PATH, "anthropic": ANTHROPIC_MESSAGES_PATH}
MODEL = "fake-model"
QUESTION = [ChatMessage("user", "What is the capital of France?")]


def settings_for(
    name: str, openai_url: str | None, anthropic_url: str | None, **changes: Any
) -> Settings:
    """Settings that point ``name`` at the given base URLs."""
    values: dict[str, Any] = {
        "llm_provider": name,
        "llm_model": MODEL,
        "openai_api_key": KEYS["openai"],
        "openai_base_url": openai_url,
        "anthropic_api_key": KEYS["anthropic"],
        "anthropic_base_url": anthropic_url,
        "llm_timeout": 10.0,
    }
    values.update(changes)
    return Settings().with_overrides(**values)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as running:
        yield running


@pytest.fixture(params=PROVIDERS)
async def provider(
    request: pytest.FixtureRequest, server: FakeLLMServer
) -> AsyncIterator[Provider]:
    """Each provider, through the registry, pointed at the fake server."""
    built = build_provider(
        settings_for(request.param, server.openai_base_url, server.anthropic_base_url)
    )
    yield built
    await built.aclose()


@dataclass
class Outcome:
    """What one ``stream`` call produced: the deltas before it ended, and how it ended."""

    deltas: list[str]
    error: BaseException | None
    usage: Usage


async def run(
    provider: Provider,
    messages: Sequence[ChatMessage] = QUESTION,
    *,
    system: str = "You are terse.",
    max_tokens: int = 256,
) -> Outcome:
    """Stream to the end, catching whatever ends it (so SDK exceptions would be seen too)."""
    usage = Usage()
    deltas: list[str] = []
    try:
        async for delta in provider.stream(
            messages, system=system, max_tokens=max_tokens, usage=usage
        ):
            deltas.append(delta)
    except Exception as exc:
        return Outcome(deltas, exc, usage)
    return Outcome(deltas, None, usage)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- streaming -----------------------------------------------------------------------------


async def test_streamed_chunks_arrive_as_sent_and_join_exactly(
    provider: Provider, server: FakeLLMServer
) -> None:
    chunks = ["Par", "is", " — ", "the capital.\n\n", "```py\nprint('é')\n```", "  trailing "]
    server.enqueue(answer(chunks=chunks))
    outcome = await run(provider)
    assert outcome.error is None
    assert outcome.deltas == chunks
    assert "".join(outcome.deltas) == "".join(chunks)


async def test_empty_deltas_are_skipped(provider: Provider, server: FakeLLMServer) -> None:
    server.enqueue(answer(chunks=["", "a", "", "b", ""]))
    outcome = await run(provider)
    assert outcome.deltas == ["a", "b"]


async def test_default_answer_echoes_the_last_user_message(
    provider: Provider, server: FakeLLMServer
) -> None:
    messages = [
        ChatMessage("user", "first question"),
        ChatMessage("assistant", "first answer"),
        ChatMessage("user", "second question"),
    ]
    outcome = await run(provider, messages)
    assert outcome.error is None
    assert "".join(outcome.deltas) == echo_answer("second question")
    assert outcome.deltas == split_words(echo_answer("second question"))


async def test_usage_reported_by_the_server_is_recorded(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(answer("four words of answer", input_tokens=123, output_tokens=45))
    outcome = await run(provider)
    assert (outcome.usage.input_tokens, outcome.usage.output_tokens) == (123, 45)


async def test_default_usage_counts_the_prompt(provider: Provider, server: FakeLLMServer) -> None:
    outcome = await run(provider, system="Be brief please")
    expected_in = count_words("Be brief please", QUESTION[0].content)
    expected_out = len(split_words(echo_answer(QUESTION[0].content)))
    assert (outcome.usage.input_tokens, outcome.usage.output_tokens) == (expected_in, expected_out)


async def test_a_finished_answer_reports_stop(provider: Provider, server: FakeLLMServer) -> None:
    outcome = await run(provider)
    assert outcome.usage.finish_reason == "stop"
    assert not outcome.usage.cut_at_limit


async def test_an_answer_cut_at_max_tokens_reports_length(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(answer("one two three four five six"))
    outcome = await run(provider, max_tokens=2)
    assert outcome.error is None
    assert outcome.deltas == ["one ", "two "]
    # Anthropic says stop_reason "max_tokens"; both arrive as "length".
    assert outcome.usage.finish_reason == "length"
    assert outcome.usage.cut_at_limit


async def test_a_scripted_length_finish_arrives_as_length(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(cut_at_limit("short"))
    assert (await run(provider)).usage.finish_reason == "length"


async def test_an_unknown_finish_reason_passes_through(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(answer("no", finish="content_filter"))
    assert (await run(provider)).usage.finish_reason == "content_filter"


async def test_a_dropped_stream_reports_no_finish_reason(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(cut(after=1, text="a b c"))
    outcome = await run(provider)
    assert isinstance(outcome.error, TransientProviderError)
    assert outcome.usage.finish_reason is None


@pytest.mark.parametrize("style", ["vendor", "llama.cpp"])
async def test_a_context_overflow_is_recognised_with_its_sizes(
    provider: Provider, server: FakeLLMServer, style: Any
) -> None:
    server.enqueue(context_overflow(limit=8192, requested=9001, style=style))
    outcome = await run(provider)
    error = outcome.error
    assert type(error) is ContextOverflowError, repr(error)
    assert isinstance(error, PermanentProviderError)  # never retried
    assert (error.limit, error.requested, error.status) == (8192, 9001, 400)
    assert "9,001 tokens for a 8,192-token context" in str(error)
    assert error.__cause__ is not None
    assert len(server.chat_requests()) == 1


async def test_a_server_with_a_small_context_refuses_long_prompts(provider: Provider) -> None:
    async with FakeLLMServer(context_tokens=5) as small:
        built = build_provider(
            settings_for(provider.name, small.openai_base_url, small.anthropic_base_url)
        )
        try:
            fits = await run(built, [ChatMessage("user", "two words")], system="")
            too_long = await run(built, [ChatMessage("user", "one two three four five six")])
        finally:
            await built.aclose()
    assert fits.error is None
    assert isinstance(too_long.error, ContextOverflowError)
    assert too_long.error.limit == 5
    assert too_long.error.requested == count_words("You are terse.", "one two three four five six")


async def test_other_bad_requests_are_not_context_overflows(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(bad_request("max_tokens: must be at most 4096 tokens"))
    outcome = await run(provider)
    assert type(outcome.error) is PermanentProviderError


async def test_slow_tokens_still_arrive_whole(provider: Provider, server: FakeLLMServer) -> None:
    server.enqueue(slow(0.01, "one two three"))
    outcome = await run(provider)
    assert "".join(outcome.deltas) == "one two three"


async def test_stopping_early_closes_the_stream_and_the_next_request_works(
    provider: Provider, server: FakeLLMServer
) -> None:
    server.enqueue(answer(chunks=["a", "b", "c"]), answer(chunks=["x", "y"]))
    stream = provider.stream(QUESTION, system="", max_tokens=10)
    assert await anext(stream) == "a"
    await stream.aclose()  # type: ignore[attr-defined]
    assert (await run(provider)).deltas == ["x", "y"]


async def test_complete_joins_the_stream(provider: Provider, server: FakeLLMServer) -> None:
    server.enqueue(answer(chunks=["sum", "mary"]))
    assert await provider.complete(QUESTION, system="", max_tokens=10) == "summary"


# -- what goes over the wire ---------------------------------------------------------------

HISTORY = [
    ChatMessage("user", "hello"),
    ChatMessage("assistant", "hi, how can I help?"),
    ChatMessage("user", "tell me a joke"),
]


async def test_openai_request_shape(server: FakeLLMServer) -> None:
    provider = OpenAIProvider(settings_for("openai", server.openai_base_url, None))
    try:
        await run(provider, HISTORY, system="You are a comedian.", max_tokens=77)
    finally:
        await provider.aclose()
    (request,) = server.chat_requests()
    assert request.path == OPENAI_CHAT_PATH
    assert request.headers["authorization"] == f"Bearer {KEYS['openai']}"
    body = request.body
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    # An OPENAI_BASE_URL server gets max_tokens, which every compatible server knows.
    assert body["max_tokens"] == 77
    assert "max_completion_tokens" not in body
    assert body["messages"] == [
        {"role": "system", "content": "You are a comedian."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi, how can I help?"},
        {"role": "user", "content": "tell me a joke"},
    ]


async def test_anthropic_request_shape(server: FakeLLMServer) -> None:
    provider = AnthropicProvider(settings_for("anthropic", None, server.anthropic_base_url))
    try:
        await run(provider, HISTORY, system="You are a comedian.", max_tokens=77)
    finally:
        await provider.aclose()
    (request,) = server.chat_requests()
    assert request.path == ANTHROPIC_MESSAGES_PATH
    # The API documents x-api-key; SDK 2.x sends the key as a bearer token.
    sent_key = request.headers.get("x-api-key") or request.headers["authorization"]
    assert sent_key.removeprefix("Bearer ") == KEYS["anthropic"]
    assert "anthropic-version" in request.headers
    body = request.body
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["max_tokens"] == 77
    assert body["system"] == "You are a comedian."
    assert body["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi, how can I help?"},
        {"role": "user", "content": "tell me a joke"},
    ]


async def test_an_empty_system_prompt_is_not_sent(
    provider: Provider, server: FakeLLMServer
) -> None:
    await run(provider, system="")
    (request,) = server.chat_requests()
    if provider.name == "openai":
        assert [m["role"] for m in request.body["messages"]] == ["user"]
    else:
        assert "system" not in request.body


async def test_openai_base_url_without_a_key_sends_a_placeholder(server: FakeLLMServer) -> None:
    settings = settings_for("openai", server.openai_base_url, None, openai_api_key=None)
    provider = build_provider(settings)
    try:
        outcome = await run(provider)
    finally:
        await provider.aclose()
    assert outcome.error is None
    assert server.chat_requests()[0].headers["authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"
    assert server.openai_base_url in provider.label


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_missing_key_without_a_base_url_is_a_config_error(name: str) -> None:
    settings = settings_for(name, None, None, openai_api_key=None, anthropic_api_key=None)
    with pytest.raises(ConfigError) as caught:
        build_provider(settings)
    assert caught.value.setting == KEY_SETTINGS[name]
    assert KEY_SETTINGS[name] in str(caught.value)


def test_default_models_and_registry() -> None:
    openai_provider = build_provider(
        Settings().with_overrides(llm_provider="openai", openai_api_key="k")
    )
    anthropic_provider = build_provider(
        Settings().with_overrides(llm_provider="anthropic", anthropic_api_key="k")
    )
    assert isinstance(openai_provider, OpenAIProvider)
    assert isinstance(anthropic_provider, AnthropicProvider)
    assert openai_provider.model == OpenAIProvider.default_model
    assert anthropic_provider.model == AnthropicProvider.default_model
    assert openai_provider.key_env_var == "OPENAI_API_KEY"
    assert anthropic_provider.key_env_var == "ANTHROPIC_API_KEY"
    # The SDK clients are built for one attempt: core/retry.py is the retry layer.
    assert openai_provider.client.max_retries == 0  # type: ignore[attr-defined]
    assert anthropic_provider.client.max_retries == 0  # type: ignore[attr-defined]


async def test_aclose_closes_the_sdk_client(provider: Provider) -> None:
    assert (await run(provider)).error is None
    await provider.aclose()
    assert provider.client.is_closed()  # type: ignore[attr-defined]


async def test_aclose_before_any_request_builds_no_client(provider: Provider) -> None:
    await provider.aclose()
    assert provider._client is None  # type: ignore[attr-defined]


SDK_MODULES = {"openai": "core.providers.openai", "anthropic": "core.providers.anthropic"}


@pytest.mark.parametrize("name", PROVIDERS)
def test_a_provider_module_imports_no_sdk_until_its_provider_is_built(name: str) -> None:
    """``import anthropic`` alone costs over a second: only a built provider pays for its SDK."""
    other = "anthropic" if name == "openai" else "openai"
    script = (
        "import sys\n"
        "import core.providers.failures, core.providers.openai, core.providers.anthropic\n"
        "assert 'openai' not in sys.modules and 'anthropic' not in sys.modules, 'at import'\n"
        "from core.config import Settings\n"
        "from core.providers import build_provider\n"
        f"p = build_provider(Settings().with_overrides(llm_provider={name!r},\n"
        "    openai_api_key='k', anthropic_api_key='k'))\n"
        "p._sdk.module()\n"
        f"assert {name!r} in sys.modules, 'not loaded once built'\n"
        f"assert {other!r} not in sys.modules, 'the other SDK was loaded'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


# -- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A scripted failure and what the provider must turn it into."""

    reply: Reply
    error: type[ProviderError]
    retry_after: float | None = None
    status: int | None = None
    mentions: str | None = None  # a word the one-line message must contain
    deltas_before: int = 0


FAULTS = {
    "429 retry-after": Fault(rate_limited(2), TransientProviderError, 2.0, 429),
    "429 retry-after-ms": Fault(
        rate_limited(None, retry_after_ms=1500), TransientProviderError, 1.5, 429
    ),
    "429 fractional": Fault(rate_limited(0.25), TransientProviderError, 0.25, 429),
    "429 absurd retry-after": Fault(
        rate_limited(86_400), TransientProviderError, MAX_RETRY_AFTER_SECONDS, 429
    ),
    "429 garbage retry-after": Fault(rate_limited("soon"), TransientProviderError, None, 429),
    "500": Fault(server_error(500), TransientProviderError, None, 500),
    "502": Fault(server_error(502), TransientProviderError, None, 502),
    "503 with retry-after": Fault(http_error(503, retry_after=3), TransientProviderError, 3.0, 503),
    "529 overloaded": Fault(overloaded(), TransientProviderError, None, 529, "overloaded"),
    "401": Fault(unauthorized(), ProviderAuthError, None, 401, "KEY"),
    "403": Fault(http_error(403), ProviderAuthError, None, 403, "KEY"),
    "404 unknown model": Fault(unknown_model(), PermanentProviderError, None, 404, "LLM_MODEL"),
    "400": Fault(
        bad_request("messages: roles must alternate"),
        PermanentProviderError,
        None,
        400,
        "roles must alternate",
    ),
    "cut mid-stream": Fault(
        cut(after=2, text="a b c d e"), TransientProviderError, deltas_before=2
    ),
    "cut before any text": Fault(cut(after=0), TransientProviderError),
    "malformed chunk": Fault(
        malformed(after=1), TransientProviderError, mentions="malformed", deltas_before=1
    ),
    "error event overloaded": Fault(
        stream_error(after=2), TransientProviderError, mentions="Overloaded", deltas_before=2
    ),
    "error event invalid request": Fault(
        stream_error(after=1, error_type="invalid_request_error", message="bad input"),
        PermanentProviderError,
        mentions="bad input",
        deltas_before=1,
    ),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
async def test_faults_map_to_our_errors_after_exactly_one_request(
    provider: Provider, server: FakeLLMServer, fault: Fault
) -> None:
    server.enqueue(fault.reply)
    outcome = await run(provider)
    error = outcome.error
    # Exactly our type: a Transient must not be a Permanent and vice versa, and nothing else.
    assert type(error) is fault.error, repr(error)
    assert isinstance(error, ProviderError)
    assert error.__cause__ is not None  # raised `from` the SDK's exception
    assert "\n" not in str(error)
    if isinstance(error, TransientProviderError):
        assert error.retry_after == fault.retry_after
    if fault.status is not None:
        assert error.status == fault.status
    if fault.mentions == "KEY":
        assert isinstance(error, ProviderAuthError)
        assert error.setting == KEY_SETTINGS[provider.name]
        assert KEY_SETTINGS[provider.name] in str(error)
    elif fault.mentions is not None:
        assert fault.mentions.lower() in str(error).lower()
    assert len(outcome.deltas) == fault.deltas_before
    # max_retries=0: the SDK made one attempt; retrying is core/retry.py's job.
    assert len(server.chat_requests()) == 1
    assert server.pending == 0


async def test_openai_insufficient_quota_is_not_retried(server: FakeLLMServer) -> None:
    provider = OpenAIProvider(settings_for("openai", server.openai_base_url, None))
    server.enqueue(
        http_error(429, code="insufficient_quota", message="You exceeded your current quota")
    )
    try:
        outcome = await run(provider)
    finally:
        await provider.aclose()
    assert type(outcome.error) is PermanentProviderError
    assert "OPENAI_API_KEY" in str(outcome.error)


async def test_a_wrong_key_is_refused_and_names_the_setting() -> None:
    async with FakeLLMServer(api_key="the-right-key") as server:
        for name in PROVIDERS:
            provider = build_provider(
                settings_for(name, server.openai_base_url, server.anthropic_base_url)
            )
            try:
                outcome = await run(provider)
            finally:
                await provider.aclose()
            assert isinstance(outcome.error, ProviderAuthError)
            assert outcome.error.setting == KEY_SETTINGS[name]
            assert f"set {KEY_SETTINGS[name]}" in str(outcome.error)


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_read_timeout_is_transient_and_names_llm_timeout(
    name: str, server: FakeLLMServer
) -> None:
    # The server waits far longer than the timeout before each text chunk; no assertion on
    # time, only on what the timeout is turned into.
    provider = build_provider(
        settings_for(name, server.openai_base_url, server.anthropic_base_url, llm_timeout=0.2)
    )
    server.enqueue(slow(30, "never arrives"))
    try:
        outcome = await run(provider)
    finally:
        await provider.aclose()
    assert type(outcome.error) is TransientProviderError
    assert "LLM_TIMEOUT" in str(outcome.error)
    assert outcome.deltas == []
    assert len(server.chat_requests()) == 1


@pytest.mark.parametrize("name", PROVIDERS)
async def test_connection_refused_is_transient_and_names_the_base_url_setting(name: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    provider = build_provider(settings_for(name, f"{url}/v1", url))
    try:
        outcome = await run(provider)
    finally:
        await provider.aclose()
    assert type(outcome.error) is TransientProviderError
    assert URL_SETTINGS[name] in str(outcome.error)
    assert "127.0.0.1" in str(outcome.error)


# -- Retry-After parsing -----------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    clock = now.timestamp
    in_ten = format_datetime(now + timedelta(seconds=10), usegmt=True)
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after": " 1.5 "}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "junk", "retry-after": "9"}) == 9.0
    assert retry_after_seconds({"retry-after": in_ten}, now=clock) == 10.0
    assert retry_after_seconds({"retry-after": "999999"}) == MAX_RETRY_AFTER_SECONDS
    assert retry_after_seconds({"retry-after": "-3"}) is None
    assert retry_after_seconds({"retry-after": "nan"}) is None
    assert retry_after_seconds({"retry-after": "later"}) is None
    past = format_datetime(now - timedelta(seconds=10), usegmt=True)
    assert retry_after_seconds({"retry-after": past}, now=clock) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(None) is None


# -- the server as a separate process ----------------------------------------------------------


async def test_server_subprocess_is_driven_over_its_control_api() -> None:
    with LLMServerProcess.start() as process:
        process.enqueue(rate_limited(4), answer(chunks=["from ", "a ", "subprocess"]))
        provider = build_provider(
            settings_for("openai", process.openai_base_url, process.anthropic_base_url)
        )
        try:
            first = await run(provider)
            second = await run(provider)
        finally:
            await provider.aclose()
        recorded = process.requests()
    assert isinstance(first.error, TransientProviderError) and first.error.retry_after == 4.0
    assert second.deltas == ["from ", "a ", "subprocess"]
    assert [r["path"] for r in recorded] == [OPENAI_CHAT_PATH, OPENAI_CHAT_PATH]
    assert recorded[1]["body"]["messages"][-1]["content"] == QUESTION[0].content
    # SIGTERM stops it cleanly.
    assert process.process.returncode == 0


# -- the fake server's other endpoints -------------------------------------------------------


async def test_non_streamed_requests_and_model_lists(server: FakeLLMServer) -> None:
    openai_provider = OpenAIProvider(settings_for("openai", server.openai_base_url, None))
    anthropic_provider = AnthropicProvider(
        settings_for("anthropic", None, server.anthropic_base_url)
    )
    try:
        server.enqueue(answer("whole answer", output_tokens=2), answer("another one"))
        completion = await openai_provider.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        message = await anthropic_provider.client.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
        openai_models = [m.id async for m in openai_provider.client.models.list()]
        anthropic_models = [m.id async for m in anthropic_provider.client.models.list()]
    finally:
        await openai_provider.aclose()
        await anthropic_provider.aclose()
    assert completion.choices[0].message.content == "whole answer"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert message.content[0].type == "text" and message.content[0].text == "another one"
    assert openai_models == anthropic_models and openai_models


async def test_control_api_rejects_unknown_fields_and_resets(server: FakeLLMServer) -> None:
    provider = OpenAIProvider(settings_for("openai", server.openai_base_url, None))
    http = provider.client._client  # the SDK's own httpx2 client, for plain HTTP calls
    try:
        refused = await http.post(f"{server.url}/_control/enqueue", json={"kind": "cut", "oops": 1})
        accepted = await http.post(f"{server.url}/_control/enqueue", json=[cut(1).to_json()])
        assert server.pending == 1
        await http.post(f"{server.url}/_control/reset")
        recorded = (await http.get(f"{server.url}/_control/requests")).json()
    finally:
        await provider.aclose()
    assert refused.status_code == 400 and "oops" in refused.text
    assert accepted.json() == {"pending": 1}
    assert server.pending == 0 and recorded == []


async def test_openai_wire_alternates_roles_for_strict_chat_templates(
    server: FakeLLMServer,
) -> None:
    provider = build_provider(settings_for("openai", server.openai_base_url, None))
    server.enqueue(answer("ok"))
    messages = [
        ChatMessage("user", "@bob: the deploy failed"),
        ChatMessage("user", "@carol: disk full"),
        ChatMessage("assistant", "Free some space."),
        ChatMessage("user", "done"),
    ]
    await run(provider, messages)
    await provider.aclose()
    sent = server.chat_requests()[-1].body["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "You are terse."),
        ("user", "@bob: the deploy failed\n\n@carol: disk full"),
        ("assistant", "Free some space."),
        ("user", "done"),
    ]


# -- the model asked for -------------------------------------------------------------------


async def test_stream_asks_for_the_model_given_and_names_it_in_errors(
    provider: Provider, server: FakeLLMServer
) -> None:
    usage = Usage()
    deltas = [
        d
        async for d in provider.stream(
            QUESTION, system="", max_tokens=64, usage=usage, model="other-model"
        )
    ]
    assert deltas and server.chat_requests()[-1].body["model"] == "other-model"
    server.enqueue(unknown_model())
    failed = await run_with_model(provider, "missing-model")
    assert isinstance(failed, PermanentProviderError) and "'missing-model'" in str(failed)
    # Without a model the provider's own (LLM_MODEL) is asked for.
    await run(provider)
    assert server.chat_requests()[-1].body["model"] == MODEL
    assert provider.label_for("other-model") == provider.label.replace(MODEL, "other-model")


async def run_with_model(provider: Provider, model: str) -> BaseException | None:
    try:
        async for _ in provider.stream(QUESTION, system="", max_tokens=64, model=model):
            pass
    except Exception as exc:
        return exc
    return None
