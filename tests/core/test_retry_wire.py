"""The retry policy through the real SDKs: engine + OpenAI/Anthropic providers + fake server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import ChatEngine
from core.providers import build_provider
from core.reply import CollectingSink
from core.retry import RetryPolicy
from core.store import ConversationStore
from tests.conftest import RecordedSleep
from tests.wire.llm_server import (
    FakeLLMServer,
    answer,
    cut,
    malformed,
    overloaded,
    rate_limited,
    server_error,
    stream_error,
    unauthorized,
)

KEY = ConversationKey("cli", "local", "retry")
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as running:
        yield running


@pytest.fixture(params=["openai", "anthropic"])
async def wired(
    request: pytest.FixtureRequest,
    server: FakeLLMServer,
    store: ConversationStore,
    recorded_sleep: RecordedSleep,
) -> AsyncIterator[ChatEngine]:
    settings = Settings.from_mapping(
        {
            "LLM_PROVIDER": request.param,
            "LLM_MODEL": "fake-model",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.openai_base_url,
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "LLM_TIMEOUT": "10",
        }
    )
    provider = build_provider(settings)
    engine = ChatEngine(
        settings, store, provider, retry=RetryPolicy(max_attempts=4, sleep=recorded_sleep)
    )
    yield engine
    # Background upkeep (calibration, summaries) finishes before the store closes.
    if engine._background:
        await asyncio.wait(engine._background, timeout=5)
    await provider.aclose()


def ask(text: str = "Tell me about foxes.") -> IncomingMessage:
    return IncomingMessage(key=KEY, text=text, user_id="u")


async def assistant_messages(engine: ChatEngine) -> list[str]:
    conversation = await engine.store.find(KEY)
    assert conversation is not None
    return [
        m.content
        for m in await engine.store.history(conversation, limit=None)
        if m.role == "assistant"
    ]


async def test_rate_limit_then_answer_waits_retry_after_and_sends_once_more(
    wired: ChatEngine, server: FakeLLMServer, recorded_sleep: RecordedSleep
) -> None:
    server.enqueue(rate_limited(2), answer(TEXT))
    sink = CollectingSink()
    result = await wired.handle(ask(), sink)
    assert result.status == "answered" and sink.text == TEXT
    assert recorded_sleep.waits == [2.0]
    assert len(server.chat_requests()) == 2
    assert await assistant_messages(wired) == [TEXT]


async def test_stream_cut_midway_restarts_and_replaces_the_partial_text(
    wired: ChatEngine, server: FakeLLMServer
) -> None:
    server.enqueue(cut(after=3, text=TEXT), answer(TEXT))
    sink = CollectingSink()
    result = await wired.handle(ask(), sink)
    assert result.status == "answered"
    assert sink.text == TEXT  # no repeated words
    assert len(sink.notices) == 1  # words had been shown, so the retry was announced
    assert len(server.chat_requests()) == 2
    assert await assistant_messages(wired) == [TEXT]


@pytest.mark.parametrize("fault", [server_error(503), overloaded(), malformed(after=2)])
async def test_transient_faults_are_retried_through_the_sdk(
    wired: ChatEngine, server: FakeLLMServer, fault: object
) -> None:
    server.enqueue(fault, answer(TEXT))  # type: ignore[arg-type]
    sink = CollectingSink()
    assert (await wired.handle(ask(), sink)).status == "answered"
    assert sink.text == TEXT and len(server.chat_requests()) == 2


async def test_mid_stream_error_event_is_retried(wired: ChatEngine, server: FakeLLMServer) -> None:
    server.enqueue(stream_error(after=2), answer(TEXT))
    sink = CollectingSink()
    assert (await wired.handle(ask(), sink)).status == "answered"
    assert sink.text == TEXT


async def test_attempts_run_out_into_plain_words_and_no_stored_answer(
    wired: ChatEngine, server: FakeLLMServer, recorded_sleep: RecordedSleep
) -> None:
    server.enqueue(*[server_error(500)] * 4)
    sink = CollectingSink()
    result = await wired.handle(ask(), sink)
    assert result.status == "failed"
    assert sink.error is not None and "tried 4 times" in sink.error
    assert len(server.chat_requests()) == 4  # max_retries=0 in the SDK: ours is the only layer
    assert len(recorded_sleep.waits) == 3 and max(recorded_sleep.waits) <= 5
    assert await assistant_messages(wired) == []


async def test_refused_key_is_not_retried_and_names_the_setting(
    wired: ChatEngine, server: FakeLLMServer, recorded_sleep: RecordedSleep
) -> None:
    server.enqueue(unauthorized())
    sink = CollectingSink()
    assert (await wired.handle(ask(), sink)).status == "failed"
    assert len(server.chat_requests()) == 1 and recorded_sleep.waits == []
    assert sink.error is not None
    assert ("OPENAI_API_KEY" in sink.error) or ("ANTHROPIC_API_KEY" in sink.error)


async def test_history_is_sent_on_the_wire(wired: ChatEngine, server: FakeLLMServer) -> None:
    server.enqueue(answer("Four."), answer("Eight."))
    await wired.handle(ask("2+2?"), CollectingSink())
    await wired.handle(ask("times two?"), CollectingSink())
    body = server.chat_requests()[-1].body
    contents = [m["content"] for m in body["messages"] if m["role"] != "system"]
    flat = [c if isinstance(c, str) else c[0]["text"] for c in contents]
    assert flat == ["2+2?", "Four.", "times two?"]
