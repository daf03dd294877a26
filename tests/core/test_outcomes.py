"""Every accepted question ends in an outcome the user sees and the history agrees with.

Failed questions are never sent again; stopped, interrupted and cut answers are kept as shown;
writes survive a database hiccup or say they did not; a conversation that outgrows the model is
refitted; a queued message shows a sign of life at once; failures read in plain words.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event

from core.commands import CANCELLED_BY_RESET, Command
from core.config import Settings
from core.conversation import ConversationKey, IncomingMessage
from core.engine import CANCELLED_DEFAULT, ChatEngine
from core.errors import ConfigError
from core.outcomes import UNSAVED_ANSWER_NOTE, UNSAVED_QUESTION, WAITING_NOTICE
from core.providers import build_provider
from core.providers.offline import OfflineProvider
from core.reply import CollectingSink
from core.retry import RetryPolicy
from core.store import WRITE_RETRY_WAITS, ConversationStore
from core.streaming import THINKING_TEXT
from tests.conftest import RecordedSleep
from tests.core.test_engine import every_message, stored
from tests.core.test_streaming import feed, streamer_for
from tests.fake_platform import FakeAppendSurface, FakeSurface, Platform, run_virtual
from tests.wire.llm_server import (
    FakeLLMServer,
    answer,
    bad_request,
    context_overflow,
    cut,
    cut_at_limit,
    malformed,
    overloaded,
    rate_limited,
    server_error,
    slow,
    stream_error,
    unknown_model,
)

KEY = ConversationKey("slack", "T1", "C1", "100.000")
WORKER = "worker-1"


def message(text: str, message_id: str | None = None, **kwargs: Any) -> IncomingMessage:
    return IncomingMessage(key=KEY, text=text, user_id="U1", message_id=message_id, **kwargs)


async def open_turn(store: ConversationStore, text: str) -> int:
    conversation, _ = await store.get_or_create(KEY)
    turn = await store.open_turn(
        conversation.id, platform=KEY.platform, question=text, worker=WORKER, lease_seconds=60
    )
    return turn.id


# -- 3: the writes that matter --------------------------------------------------------------


def read_only(store: ConversationStore) -> Callable[[], Awaitable[None]]:
    """Make the SQLite database refuse every write from now on (SQLite's own refusal, through
    SQLAlchemy); the returned coroutine function makes it writable again."""

    def refuse_writes(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    async def start() -> None:
        event.listen(store.engine.sync_engine, "connect", refuse_writes)
        await store.engine.dispose()  # every connection from now on is read-only

    async def undo() -> None:
        event.remove(store.engine.sync_engine, "connect", refuse_writes)
        await store.engine.dispose()

    start.undo = undo  # type: ignore[attr-defined]
    return start


class DatabaseFailsAtFinish(CollectingSink):
    """A sink after whose final text the database stops taking writes: the answer's write is
    the first to meet it."""

    def __init__(self, store: ConversationStore) -> None:
        super().__init__()
        self.break_database = read_only(store)

    async def finish(self, note: str | None = None) -> list[str]:
        ids = await super().finish(note)
        await self.break_database()
        return ids


async def test_an_answer_whose_write_fails_once_is_retried_and_kept(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    sink = DatabaseFailsAtFinish(store)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await sink.break_database.undo()  # type: ignore[attr-defined]

    engine = ChatEngine(settings, store, provider, sleep=sleep)
    provider.enqueue(["Paris."])
    result = await engine.handle(message("capital of France?"), sink)
    assert result.status == "answered" and sink.note is None
    assert waits == [WRITE_RETRY_WAITS[0]]
    assert await stored(store) == [("user", "capital of France?"), ("assistant", "Paris.")]


async def test_an_answer_that_cannot_be_saved_says_so_after_the_text(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    waits = RecordedSleep()
    engine = ChatEngine(settings, store, provider, sleep=waits)
    sink = DatabaseFailsAtFinish(store)
    provider.enqueue(["Paris."])
    result = await engine.handle(message("capital of France?"), sink)
    assert result.status == "answered" and sink.text == "Paris."
    assert sink.note == UNSAVED_ANSWER_NOTE
    # Each write that matters was retried: the answer, the turn's outcome and its usage.
    assert waits.waits == list(WRITE_RETRY_WAITS) * 3
    await sink.break_database.undo()  # type: ignore[attr-defined]
    assert await stored(store) == [("user", "capital of France?")]


async def test_a_question_that_cannot_be_saved_is_not_answered_out_of_context(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(settings, store, provider, sleep=RecordedSleep())
    await store.get_or_create(KEY)
    breaker = read_only(store)
    await breaker()
    try:
        result = await engine.handle(message("hello?"), CollectingSink())
    finally:
        await breaker.undo()  # type: ignore[attr-defined]
    assert result.status == "failed" and result.text == UNSAVED_QUESTION
    assert provider.requests == []


# -- 5: a sign of life while queued ----------------------------------------------------------


async def test_a_message_queued_behind_an_answer_shows_the_waiting_notice_at_once(
    settings: Settings, store: ConversationStore
) -> None:
    provider = OfflineProvider(settings, delay=0.01)
    engine = ChatEngine(settings, store, provider)
    provider.enqueue(["first "] * 30, ["second"])
    first, second = CollectingSink(), CollectingSink()
    one = asyncio.create_task(engine.handle(message("one", "m1"), first))
    two = asyncio.create_task(engine.handle(message("two", "m2"), second))
    while second.waited is None:
        assert not one.done(), "the notice came only after the answer before it"
        await asyncio.sleep(0)
    assert second.begun and second.waited == WAITING_NOTICE and not first.finished
    await asyncio.gather(one, two)
    assert second.text == "second"
    assert [m.content for m in provider.requests[1].messages][-1] == "two"


async def test_a_lone_message_shows_no_waiting_notice(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    provider.enqueue(["hi"])
    sink = CollectingSink()
    await engine.handle(message("hello"), sink)
    assert sink.waited is None


def test_the_streamer_shows_the_notice_then_thinking_then_the_answer() -> None:
    async def main(surface_type: type[FakeSurface]) -> tuple[list[str], list[str]]:
        platform = Platform(latency=0.05)
        surface = surface_type(platform)
        streamer = streamer_for(surface)
        await streamer.begin()
        await streamer.waiting(WAITING_NOTICE)
        await asyncio.sleep(5)
        shown_while_waiting = surface.messages()
        await streamer.waiting(None)
        await asyncio.sleep(1)
        shown_at_its_turn = surface.messages()
        await feed(streamer, ["The ", "answer."])
        await streamer.finish()
        return shown_while_waiting + shown_at_its_turn, surface.messages()

    for surface_type in (FakeSurface, FakeAppendSurface):
        during, final = run_virtual(main(surface_type))
        assert during == [WAITING_NOTICE, THINKING_TEXT]
        assert final == ["The answer."]


# -- 10: stopped, reset and shut down -------------------------------------------------------


async def start_long_answer(
    settings: Settings, store: ConversationStore, text: str = "long please"
) -> tuple[ChatEngine, OfflineProvider, CollectingSink, asyncio.Task[Any]]:
    provider = OfflineProvider(settings, delay=0.02)
    engine = ChatEngine(settings, store, provider)
    provider.enqueue(["word "] * 200)
    sink = CollectingSink()
    turn_id = await open_turn(store, text)
    task = asyncio.create_task(engine.handle(message(text, turn_id=turn_id), sink))
    while sink.text.count("word") < 3:
        await asyncio.sleep(0.01)
    return engine, provider, sink, task


async def test_a_stopped_answer_is_kept_as_shown_and_the_question_is_not_asked_again(
    settings: Settings, store: ConversationStore
) -> None:
    engine, provider, sink, task = await start_long_answer(settings, store)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.cancelled == CANCELLED_DEFAULT
    history = await every_message(store)
    assert history[0] == ("user", "long please", None)
    assert history[1][0] == "assistant" and history[1][2] == "stopped"
    assert sink.text.startswith(history[1][1]) and history[1][1].count("word") >= 3
    turn = await store.get_turn(1)
    assert turn.status == "stopped"
    provider.enqueue(["ok"])
    await engine.handle(message("something else"), CollectingSink())
    sent = [(m.role, m.content) for m in provider.requests[-1].messages]
    assert [role for role, _ in sent] == ["user", "assistant", "user"]
    assert sent[0][1] == "long please" and sent[2][1] == "something else"


async def test_a_question_stopped_before_any_text_is_marked_failed(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(settings, store, provider)
    asked = asyncio.Event()

    async def silent_stream(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
        asked.set()
        await asyncio.Event().wait()  # the model never says a word
        yield ""

    provider.stream = silent_stream  # type: ignore[method-assign]
    task = asyncio.create_task(engine.handle(message("are you there?"), CollectingSink()))
    await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await every_message(store) == [("user", "are you there?", "failed")]


async def test_a_reset_keeps_the_stopped_answer_in_the_old_conversation(
    settings: Settings, store: ConversationStore
) -> None:
    engine, _, sink, task = await start_long_answer(settings, store)
    await engine.run_command(Command("reset"), KEY)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sink.cancelled == CANCELLED_BY_RESET
    assert await stored(store) == []  # the new generation starts empty ...
    history = await every_message(store)
    assert [(role, status) for role, _, status in history] == [
        ("user", None),
        ("assistant", "stopped"),
    ]


async def test_a_shutdown_interrupts_the_answer_and_keeps_what_was_shown(
    settings: Settings, store: ConversationStore
) -> None:
    engine, _, sink, task = await start_long_answer(settings, store)
    await engine.cancel_all("Restarting.")
    assert task.cancelled() and sink.cancelled == "Restarting."
    history = await every_message(store)
    assert history[1][0] == "assistant" and history[1][2] == "interrupted"
    assert (await store.get_turn(1)).status == "interrupted"


# -- turn records --------------------------------------------------------------------------


async def test_a_turn_record_goes_answering_then_answered(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    seen: list[str] = []
    original = provider.stream

    async def watching(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
        seen.append((await store.get_turn(turn_id)).status)
        async for delta in original(*args, **kwargs):
            yield delta

    provider.stream = watching  # type: ignore[method-assign]
    turn_id = await open_turn(store, "hi")
    provider.enqueue(["hello"])
    await engine.handle(message("hi", turn_id=turn_id), CollectingSink())
    assert seen == ["answering"]
    turn = await store.get_turn(turn_id)
    assert turn.status == "answered" and turn.lease_until is None
    async with store.engine.connect() as conn:
        from sqlalchemy import select

        from core.store import MessageRow, TurnRow

        turn_ids = [row[0] for row in await conn.execute(select(MessageRow.turn_id))]
        finish = (await conn.execute(select(TurnRow.finish_reason))).scalar_one()
    assert turn_ids == [turn_id, turn_id]
    assert finish == "stop"


# -- through the real SDKs --------------------------------------------------------------------


@pytest.fixture(params=["openai", "anthropic"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wired_settings(server: FakeLLMServer, api: str, **extra: str) -> Settings:
    return Settings.from_mapping(
        {
            "LLM_PROVIDER": api,
            "LLM_MODEL": "fake-model",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": server.openai_base_url,
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "ANTHROPIC_BASE_URL": server.anthropic_base_url,
            "LLM_TIMEOUT": "10",
            **extra,
        }
    )


@pytest.fixture
async def wire() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


async def wired_engine(
    server: FakeLLMServer, api: str, store: ConversationStore, **extra: str
) -> ChatEngine:
    settings = wired_settings(server, api, **extra)
    retry = RetryPolicy(max_attempts=settings.max_retry_attempts, sleep=RecordedSleep())
    return ChatEngine(settings, store, build_provider(settings), retry=retry)


def request_words(body: dict[str, Any]) -> int:
    """What the fake server counts: words of the system prompt and every message."""
    texts = [body.get("system", "")] if isinstance(body.get("system"), str) else []
    for m in body["messages"]:
        content = m["content"]
        texts.append(content if isinstance(content, str) else content[0]["text"])
    return sum(len(t.split()) for t in texts)


# -- 9: cut at the reply limit ----------------------------------------------------------------


async def test_an_answer_cut_at_the_limit_is_noted_closed_and_stored_as_cut(
    api: str, wire: FakeLLMServer, store: ConversationStore
) -> None:
    engine = await wired_engine(wire, api, store, MAX_REPLY_TOKENS="300")
    turn_id = await open_turn(store, "code please")
    wire.enqueue(cut_at_limit("Here:\n```python\nprint(1)"))
    sink = CollectingSink()
    result = await engine.handle(message("code please", turn_id=turn_id), sink)
    assert result.status == "answered"
    assert sink.note is not None and "MAX_REPLY_TOKENS, 300 tokens" in sink.note
    assert await every_message(store) == [
        ("user", "code please", None),
        ("assistant", "Here:\n```python\nprint(1)", "cut"),
    ]
    async with store.engine.connect() as conn:
        from sqlalchemy import select

        from core.store import MessageRow, TurnRow

        reasons = list((await conn.execute(select(MessageRow.finish_reason))).scalars())
        turn = (await conn.execute(select(TurnRow.status, TurnRow.finish_reason))).one()
    assert reasons == [None, "length"]
    assert tuple(turn) == ("answered", "length")
    await engine.provider.aclose()


def test_the_streamer_closes_the_code_block_before_the_cut_note() -> None:
    async def main() -> list[str]:
        surface = FakeSurface(Platform(latency=0.05))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, ["Here:\n", "```py\n", "x = 1"])
        await streamer.finish("_(cut here)_")
        return surface.messages()

    assert run_virtual(main()) == ["Here:\n```py\nx = 1\n```\n\n_(cut here)_"]


def test_the_streamer_adds_a_note_after_a_finished_reply() -> None:
    async def main() -> list[str]:
        surface = FakeSurface(Platform(latency=0.05))
        streamer = streamer_for(surface)
        await streamer.begin()
        await feed(streamer, ["Done."])
        await streamer.finish()
        await streamer.amend(UNSAVED_ANSWER_NOTE)
        return surface.messages()

    assert run_virtual(main()) == [f"Done.\n\n{UNSAVED_ANSWER_NOTE}"]


# -- 8: a conversation that outgrows the model's context -----------------------------------------

LONG = " ".join(["lorem"] * 120)


async def grow(engine: ChatEngine, wire: FakeLLMServer, turns: int) -> None:
    for n in range(turns):
        wire.enqueue(answer(f"{LONG} {n}"))
        result = await engine.handle(message(f"{LONG} question {n}"), CollectingSink())
        assert result.status == "answered", result.text


@pytest.mark.parametrize("style", ["vendor", "llama.cpp"])
async def test_an_overflow_is_retried_once_with_a_window_that_fits(
    api: str, wire: FakeLLMServer, store: ConversationStore, style: str
) -> None:
    engine = await wired_engine(wire, api, store, MAX_REPLY_TOKENS="256")
    await grow(engine, wire, 6)
    before = len(wire.chat_requests())
    wire.enqueue(context_overflow(1024, 1600, style=style), answer("Fits now."))  # type: ignore[arg-type]
    sink = CollectingSink()
    result = await engine.handle(message("and now?"), sink)
    assert result.status == "answered" and sink.text == "Fits now."
    first, second = wire.chat_requests()[before:]
    assert request_words(second.body) < request_words(first.body)
    assert request_words(second.body) <= 1024 - 256
    # Later turns fit from the start: the server's figure was learned.
    wire.enqueue(answer("Again."))
    await engine.handle(message("more?"), CollectingSink())
    assert len(wire.chat_requests()) == before + 3
    await engine.provider.aclose()


async def test_a_growing_conversation_against_a_small_context_keeps_answering(
    api: str, store: ConversationStore
) -> None:
    async with FakeLLMServer(context_tokens=700) as server:
        engine = await wired_engine(server, api, store, MAX_REPLY_TOKENS="128")
        await grow(engine, server, 8)
        statuses = [status for _, _, status in await every_message(store)]
        assert statuses == [None] * 16
        await engine.provider.aclose()


async def test_with_model_context_tokens_no_request_overflows(
    api: str, store: ConversationStore
) -> None:
    async with FakeLLMServer(context_tokens=700) as server:
        engine = await wired_engine(
            server, api, store, MAX_REPLY_TOKENS="128", MODEL_CONTEXT_TOKENS="700"
        )
        await grow(engine, server, 8)
        assert len(server.chat_requests()) == 8  # never refused, never retried
        await engine.provider.aclose()


async def test_an_overflow_that_still_does_not_fit_says_what_to_do_and_is_not_resent(
    api: str, store: ConversationStore
) -> None:
    async with FakeLLMServer(context_tokens=300) as server:
        engine = await wired_engine(server, api, store, MAX_REPLY_TOKENS="64")
        sink = CollectingSink()
        huge = " ".join(["word"] * 2000)
        result = await engine.handle(message(huge), sink)
        assert result.status == "failed" and sink.error is not None
        assert "`/reset`" in sink.error and "`/history summary" in sink.error
        assert "300 tokens" in sink.error and "400" not in sink.error
        assert len(server.chat_requests()) == 2  # the request, and once refitted
        server.enqueue(answer("Small question, small answer."))
        assert (await engine.handle(message("small?"), CollectingSink())).status == "answered"
        last = server.chat_requests()[-1].body
        assert request_words(last) < 100  # the failed question was not merged into this one
        await engine.provider.aclose()


# -- 13: failures in plain words ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (cut(after=2), "the connection to the model broke off"),
        (malformed(after=1), "the connection to the model broke off"),
        (server_error(500), "server error 500"),
        (server_error(503), "overloaded"),
        (overloaded(), "overloaded"),
        (rate_limited(1), "rate-limiting"),
        (stream_error(after=1), "failed in the middle of the answer"),
    ],
)
async def test_transient_failures_read_in_plain_words(
    api: str,
    wire: FakeLLMServer,
    store: ConversationStore,
    fault: Any,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = await wired_engine(wire, api, store, MAX_RETRY_ATTEMPTS="2")
    wire.enqueue(fault, fault)
    sink = CollectingSink()
    assert (await engine.handle(message("hi"), sink)).status == "failed"
    assert sink.error is not None and reason in sink.error and "tried 2 times" in sink.error
    for jargon in ("peer closed", "chunked", "HTTP", "Error", "{"):
        assert jargon not in sink.error
    assert all(jargon not in n for n in sink.notices for jargon in ("peer closed", "HTTP"))
    await engine.provider.aclose()


async def test_a_timeout_reads_in_plain_words(
    api: str, wire: FakeLLMServer, store: ConversationStore
) -> None:
    engine = await wired_engine(wire, api, store, MAX_RETRY_ATTEMPTS="1", LLM_TIMEOUT="0.3")
    wire.enqueue(slow(5.0, "too slow"))
    sink = CollectingSink()
    assert (await engine.handle(message("hi"), sink)).status == "failed"
    assert sink.error is not None and "took too long to answer" in sink.error
    await engine.provider.aclose()


@pytest.mark.parametrize(
    ("fault", "words", "raw"),
    [
        (bad_request("messages.0.content: invalid utf-8 sequence"), "refused to answer", "utf-8"),
        (unknown_model(), "LLM_MODEL", "does not exist"),
    ],
)
async def test_permanent_failures_read_in_plain_words_with_the_detail_in_the_log(
    api: str,
    wire: FakeLLMServer,
    store: ConversationStore,
    fault: Any,
    words: str,
    raw: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = await wired_engine(wire, api, store)
    wire.enqueue(fault)
    sink = CollectingSink()
    assert (await engine.handle(message("hi"), sink)).status == "failed"
    assert sink.error is not None and words in sink.error and raw not in sink.error
    assert "HTTP" not in sink.error
    assert any("HTTP 4" in r.getMessage() for r in caplog.records)
    await engine.provider.aclose()


# -- settings ---------------------------------------------------------------------------------


def test_model_context_tokens_is_optional_and_checked() -> None:
    assert Settings.from_mapping({}).model_context_tokens is None
    assert Settings.from_mapping({"MODEL_CONTEXT_TOKENS": "4096"}).model_context_tokens == 4096
    for bad in ("lots", "10"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_mapping({"MODEL_CONTEXT_TOKENS": bad})
        assert caught.value.setting == "MODEL_CONTEXT_TOKENS"
