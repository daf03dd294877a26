"""ChatEngine turns with the scripted provider: store, history, retry, dedupe, commands."""

from __future__ import annotations

import asyncio

import pytest

from core.commands import CANCELLED_BY_RESET, ChannelTarget, Command, HelpStyle, parse_command
from core.config import Settings
from core.conversation import ChatMessage, ConversationKey, IncomingMessage
from core.engine import EMPTY_MESSAGE_HINT, ChatEngine
from core.errors import PermanentProviderError, ProviderAuthError, TransientProviderError
from core.providers.offline import OfflineProvider
from core.reply import CollectingSink
from core.retry import RetryPolicy
from core.store import ConversationStore
from tests.conftest import RecordedSleep

KEY = ConversationKey("slack", "T1", "C1", "100.000")


def message(text: str, message_id: str | None = None, **kwargs: object) -> IncomingMessage:
    return IncomingMessage(key=KEY, text=text, user_id="U1", message_id=message_id, **kwargs)  # type: ignore[arg-type]


async def stored(store: ConversationStore, key: ConversationKey = KEY) -> list[tuple[str, str]]:
    conversation = await store.find(key)
    assert conversation is not None
    return [(m.role, m.content) for m in await store.history(conversation, limit=None)]


async def every_message(
    store: ConversationStore, key: ConversationKey = KEY
) -> list[tuple[str, str, str | None]]:
    """Every stored message of every generation, with its status (the history leaves some out)."""
    from sqlalchemy import select

    from core.store import MessageRow

    conversation = await store.find(key)
    assert conversation is not None
    query = (
        select(MessageRow.role, MessageRow.content, MessageRow.status)
        .where(MessageRow.conversation_id == conversation.id)
        .order_by(MessageRow.id)
    )
    async with store.engine.connect() as conn:
        return [(row.role, row.content, row.status) for row in await conn.execute(query)]


async def test_a_turn_streams_and_stores_both_messages(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    provider.enqueue(["Hel", "lo ", "there"])
    sink = CollectingSink()
    result = await engine.handle(message("hi", "m1"), sink)
    assert result.status == "answered" and result.text == "Hello there"
    assert sink.text == "Hello there" and sink.begun and sink.finished
    assert await stored(store) == [("user", "hi"), ("assistant", "Hello there")]
    [request] = provider.requests
    assert request.system == engine.settings.system_prompt
    assert request.messages == (ChatMessage("user", "hi"),)
    assert set(provider.last_token_at) == {"hi"}


async def test_history_is_sent_and_capped_without_leading_assistant(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(settings.with_overrides(max_history_messages=4), store, provider)
    for i in range(4):
        provider.enqueue([f"answer {i}"])
        await engine.handle(message(f"question {i}", f"m{i}"), CollectingSink())
    sent = provider.requests[-1].messages
    # Four newest would start with "answer 1"; the window drops it rather than start with it.
    assert [m.content for m in sent] == ["question 2", "answer 2", "question 3"]
    assert sent[0].role == "user"


async def test_a_second_delivery_is_dropped_without_touching_the_reply(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    provider.enqueue(["once"], ["twice"])
    first, second = CollectingSink(), CollectingSink()
    results = await asyncio.gather(
        engine.handle(message("hi", "C1:1.0"), first),
        engine.handle(message("hi", "C1:1.0"), second),
    )
    assert sorted(r.status for r in results) == ["answered", "duplicate"]
    assert len(provider.requests) == 1
    untouched = second if results[1].status == "duplicate" else first
    assert not untouched.begun and untouched.text == ""
    assert await stored(store) == [("user", "hi"), ("assistant", "once")]


async def test_concurrent_turns_run_in_order_each_seeing_the_other(
    settings: Settings, store: ConversationStore
) -> None:
    provider = OfflineProvider(settings, delay=0.01)
    engine = ChatEngine(settings, store, provider)
    provider.enqueue(["first ", "answer"], ["second ", "answer"])
    results = await asyncio.gather(
        engine.handle(message("one", "m1"), CollectingSink()),
        engine.handle(message("two", "m2"), CollectingSink()),
    )
    assert [r.text for r in results] == ["first answer", "second answer"]
    assert [m.content for m in provider.requests[1].messages] == ["one", "first answer", "two"]
    assert await stored(store) == [
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "two"),
        ("assistant", "second answer"),
    ]


async def test_transient_failure_before_tokens_is_retried_silently(
    engine: ChatEngine, provider: OfflineProvider, recorded_sleep: RecordedSleep
) -> None:
    provider.enqueue([TransientProviderError("overloaded", status=529)], ["fine"])
    sink = CollectingSink()
    result = await engine.handle(message("hi"), sink)
    assert result.status == "answered" and sink.text == "fine"
    assert sink.notices == []
    assert len(recorded_sleep.waits) == 1 and 0 < recorded_sleep.waits[0] <= 5


async def test_failure_after_tokens_restarts_the_reply_without_repeating_words(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    provider.enqueue(
        ["The answer ", "is", TransientProviderError("stream cut")], ["The answer is 42."]
    )
    sink = CollectingSink()
    result = await engine.handle(message("question"), sink)
    assert result.text == "The answer is 42."
    assert sink.text == "The answer is 42."
    assert len(sink.notices) == 1 and "attempt 2 of 4" in sink.notices[0]
    assert await stored(store) == [("user", "question"), ("assistant", "The answer is 42.")]


async def test_retry_after_is_honoured_and_bounded(
    engine: ChatEngine, provider: OfflineProvider, recorded_sleep: RecordedSleep
) -> None:
    provider.enqueue(
        [TransientProviderError("slow down", retry_after=3, status=429)],
        [TransientProviderError("slow down", retry_after=3600, status=429)],
        ["ok"],
    )
    sink = CollectingSink()
    await engine.handle(message("hi"), sink)
    assert recorded_sleep.waits == [3.0, 30.0]
    # Waits this long are announced even though nothing was shown yet.
    assert len(sink.notices) == 2 and all("rate-limiting" in n for n in sink.notices)
    assert "Retrying in 30 s (attempt 3 of 4)" in sink.notices[1]


async def test_exhausted_attempts_end_in_plain_words_and_store_no_answer(
    engine: ChatEngine,
    provider: OfflineProvider,
    store: ConversationStore,
    recorded_sleep: RecordedSleep,
) -> None:
    provider.enqueue(*[["partial ", TransientProviderError("boom", status=500)]] * 4)
    sink = CollectingSink()
    result = await engine.handle(message("hi"), sink)
    assert result.status == "failed"
    assert (
        sink.error is not None
        and "tried 4 times" in sink.error
        and "server error 500" in sink.error
    )
    assert len(provider.requests) == 4 and len(recorded_sleep.waits) == 3
    waits = recorded_sleep.waits
    assert waits == sorted(waits) and max(waits) <= 5
    # The question stays on record, marked failed: it is never sent with the next one.
    assert await every_message(store) == [("user", "hi", "failed")]
    assert await stored(store) == []


@pytest.mark.parametrize(
    "error",
    [
        PermanentProviderError("model not found", status=404),
        ProviderAuthError("no", setting="OPENAI_API_KEY"),
    ],
)
async def test_permanent_errors_are_never_retried(
    engine: ChatEngine, provider: OfflineProvider, error: Exception, recorded_sleep: RecordedSleep
) -> None:
    provider.enqueue([error])
    sink = CollectingSink()
    result = await engine.handle(message("hi"), sink)
    assert result.status == "failed" and len(provider.requests) == 1
    assert recorded_sleep.waits == []
    assert sink.error
    if isinstance(error, ProviderAuthError):
        assert "OPENAI_API_KEY" in sink.error


async def test_empty_and_oversized_messages_get_a_clear_answer_and_nothing_is_lost(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    engine = ChatEngine(settings.with_overrides(max_input_chars=1000), store, provider)
    provider.enqueue(["kept"])
    await engine.handle(message("first", "m1"), CollectingSink())
    empty = CollectingSink()
    assert (await engine.handle(message("   ", "m2"), empty)).status == "rejected"
    assert empty.text == EMPTY_MESSAGE_HINT and empty.finished
    huge = CollectingSink()
    assert (await engine.handle(message("x" * 100_000, "m3"), huge)).status == "rejected"
    assert "100,000 characters" in huge.text and "1,000" in huge.text
    assert await stored(store) == [("user", "first"), ("assistant", "kept")]
    assert len(provider.requests) == 1


async def test_empty_answer_is_reported_not_stored(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    provider.enqueue([])
    sink = CollectingSink()
    assert (await engine.handle(message("hi"), sink)).status == "failed"
    assert sink.error and "empty answer" in sink.error
    assert await every_message(store) == [("user", "hi", "failed")]


async def test_system_prompt_precedence_conversation_then_channel_then_default(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    provider.enqueue(["a"], ["b"], ["c"], ["d"])
    await engine.handle(message("1"), CollectingSink())
    await engine.run_command(
        Command("system_set", "channel rules"), ChannelTarget("slack", "T1", "C1")
    )
    await engine.handle(message("2"), CollectingSink())
    await engine.run_command(Command("system_set", "thread rules"), KEY)
    await engine.handle(message("3"), CollectingSink())
    await engine.run_command(Command("system_clear"), KEY)
    await engine.handle(message("4"), CollectingSink())
    assert [r.system for r in provider.requests] == [
        engine.settings.system_prompt,
        "channel rules",
        "thread rules",
        "channel rules",
    ]


async def test_commands_as_words_act_on_the_conversation(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    provider.enqueue(["before"], ["after"])
    await engine.handle(message("remember 7"), CollectingSink())
    shown = CollectingSink()
    assert (await engine.handle(message("system"), shown)).status == "command"
    assert "the bot's default" in shown.text
    reset = CollectingSink()
    assert (await engine.handle(message("reset"), reset)).status == "command"
    assert "reset" in reset.text.lower()
    await engine.handle(message("what number?"), CollectingSink())
    assert [m.content for m in provider.requests[-1].messages] == ["what number?"]
    conversation = await store.find(KEY)
    assert conversation is not None
    assert await store.count_messages(conversation, all_generations=True) == 4
    # Commands are words only where the adapter allows them.
    provider.enqueue(["an answer"])
    plain = CollectingSink()
    assert (await engine.handle(message("reset", allow_commands=False), plain)).status == "answered"


async def test_channel_commands_set_defaults_for_new_threads(engine: ChatEngine) -> None:
    target = ChannelTarget("slack", "T1", "C9")
    assert "no default system prompt" in await engine.run_command(Command("system_show"), target)
    await engine.run_command(Command("system_set", "Be formal."), target)
    assert "Be formal." in await engine.run_command(Command("system_show"), target)
    assert "new thread always starts afresh" in await engine.run_command(Command("reset"), target)
    await engine.run_command(Command("system_clear"), target)
    assert "no default system prompt" in await engine.run_command(Command("system_show"), target)
    too_long = await engine.run_command(Command("system_set", "x" * 9000), target)
    assert "limit" in too_long
    assert "`/reset`" in await engine.run_command(Command("help"), target)


async def test_reset_cancels_the_answer_in_flight_with_a_note(
    settings: Settings, store: ConversationStore
) -> None:
    provider = OfflineProvider(settings, delay=0.05)
    engine = ChatEngine(settings, store, provider)
    provider.enqueue(["word "] * 100)
    sink = CollectingSink()
    turn = asyncio.create_task(engine.handle(message("long please"), sink))
    while not sink.text:
        await asyncio.sleep(0.01)
    await engine.run_command(Command("reset"), KEY)
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert sink.cancelled == CANCELLED_BY_RESET
    conversation = await store.find(KEY)
    assert conversation is not None and await store.history(conversation, limit=None) == []


async def test_stop_ends_the_turn_with_a_result_keeping_what_was_shown(
    settings: Settings, store: ConversationStore
) -> None:
    provider = OfflineProvider(settings, delay=0.05)
    engine = ChatEngine(settings, store, provider)
    provider.enqueue(["word "] * 100)
    sink = CollectingSink()
    turn = asyncio.create_task(engine.handle(message("long please"), sink))
    while not sink.text:
        await asyncio.sleep(0.01)
    conversation = await store.find(KEY)
    assert conversation is not None and engine.answering(conversation.id)
    assert await engine.stop(conversation.id, "_Stopped._")
    result = await turn  # a result, not a cancellation: nothing is being torn down
    assert result.status == "cancelled" and result.text.startswith("word ")
    assert sink.cancelled == "_Stopped._"
    assert not engine.answering(conversation.id)
    assert not await engine.stop(conversation.id, "_Stopped._")
    window = await store.history(conversation, limit=None)
    assert [(m.role, m.status) for m in window] == [("user", None), ("assistant", "stopped")]
    assert window[1].content == result.text


async def test_thread_context_seeds_a_new_conversation(
    engine: ChatEngine, provider: OfflineProvider
) -> None:
    provider.enqueue(["seen"])
    context = (ChatMessage("user", "we deploy on fridays"), ChatMessage("user", "is that wise?"))
    await engine.handle(message("what do you think?", thread_context=context), CollectingSink())
    assert [m.content for m in provider.requests[0].messages] == [
        "we deploy on fridays",
        "is that wise?",
        "what do you think?",
    ]
    assert await engine.knows(KEY)
    assert not await engine.knows(ConversationKey("slack", "T1", "C1", "999"))


async def test_engine_with_real_retry_policy_shape(settings: Settings) -> None:
    policy = RetryPolicy(max_attempts=4, random=lambda: 1.0)
    waits = [policy.wait_seconds(n, TransientProviderError("x")) for n in range(1, 8)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    low = RetryPolicy(random=lambda: 0.0)
    assert low.wait_seconds(3, TransientProviderError("x")) == 1.0


async def test_history_settings_per_channel_change_what_is_sent(
    engine: ChatEngine, provider: OfflineProvider, store: ConversationStore
) -> None:
    channel = ChannelTarget("slack", "T1", "C1")
    shown = await engine.run_command(parse_command("history"), channel)  # type: ignore[arg-type]
    assert "newest 20 messages" in shown and "the bot's default" in shown
    answer = await engine.run_command(parse_command("history count 2"), KEY)  # type: ignore[arg-type]
    assert "newest 2 messages" in answer and "this channel's setting" in answer
    for i in range(3):
        provider.enqueue([f"a{i}"])
        await engine.handle(message(f"q{i}"), CollectingSink())
    assert [m.content for m in provider.requests[-1].messages] == ["q2"]
    tokens = await engine.run_command(parse_command("history tokens 6,000"), channel)  # type: ignore[arg-type]
    assert "fit 6,000 tokens" in tokens
    assert (await store.channel_settings("slack", "T1", "C1")).history_strategy == "tokens"
    cleared = await engine.run_command(parse_command("history clear"), channel)  # type: ignore[arg-type]
    assert "newest 20 messages" in cleared and "the bot's default" in cleared


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("history count 0", "between 1 and 500"),
        ("history tokens lots", "not a number"),
        ("history fancy", "don't know that history setting"),
    ],
)
async def test_mistyped_history_commands_explain_themselves(
    engine: ChatEngine, text: str, problem: str
) -> None:
    command = parse_command(text)
    assert command is not None and command.action == "help"
    engine.commands.help_styles["chat"] = HelpStyle(prefix="/chatbot ")
    answer = await engine.run_command(command, ChannelTarget("chat", "T1", "C1"))
    assert problem in answer and "/chatbot history" in answer


async def test_help_is_worded_in_each_platforms_own_command_forms(engine: ChatEngine) -> None:
    engine.commands.help_styles["typed"] = HelpStyle(prefix="/chatbot ")
    engine.commands.help_styles["app"] = HelpStyle(prefix="/", app_commands=True)
    engine.commands.help_styles["term"] = HelpStyle(prefix="/", threads=False)
    typed = await engine.run_command(Command("help"), ChannelTarget("typed", "G1", "C1"))
    assert "`/chatbot system <text>`" in typed and "mention me" in typed
    app = await engine.run_command(Command("help"), ChannelTarget("app", "G1", "C1"))
    assert "/system set <text>" in app and "/history show" in app
    term = await engine.run_command(Command("help"), ConversationKey("term", "local", "me"))
    assert "`/reset`" in term and "thread" not in term


async def test_old_processed_events_are_forgotten_hourly(
    settings: Settings, store: ConversationStore, provider: OfflineProvider
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from core.store import ProcessedEventRow, _now

    clock = [1000.0]
    engine = ChatEngine(settings, store, provider, clock=lambda: clock[0])
    await store.claim_event("slack", "T1:old")
    async with store.engine.begin() as conn:
        await conn.execute(update(ProcessedEventRow).values(created_at=_now() - timedelta(days=3)))
    provider.enqueue(["a"], ["b"])
    await engine.handle(message("first", "m1"), CollectingSink())
    if engine._background:  # the prune may be over already
        await asyncio.wait(engine._background, timeout=5)
    # The stale event was pruned; the fresh one is still remembered, so it stays deduplicated.
    assert await store.claim_event("slack", "T1:old")
    assert (await engine.handle(message("first", "m1"), CollectingSink())).status == "duplicate"
