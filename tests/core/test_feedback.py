"""Feedback in the store and its check: append-only clicks, the latest click of a user counts,
a click counts only from a message that shows the answer it names."""

from __future__ import annotations

from core.conversation import ConversationKey
from core.feedback import BAD, GOOD, Click, Feedback, feedback_id, parse_feedback_id
from core.metrics import Metrics
from core.store import ConversationStore

KEY = ConversationKey("slack", "T1", "C1", "100.1")


async def answer(store: ConversationStore, text: str, message: str) -> int:
    conversation, _ = await store.get_or_create(KEY)
    await store.append(conversation, "user", "question", user_id="U1")
    stored = await store.append(conversation, "assistant", text, platform_message_ids=[message])
    return stored.id


def test_button_ids_round_trip_and_refuse_other_text() -> None:
    assert parse_feedback_id(feedback_id(GOOD, 42)) == (GOOD, 42)
    assert parse_feedback_id(feedback_id(BAD, 7)) == (BAD, 7)
    assert parse_feedback_id("good:") is None
    assert parse_feedback_id("meh:3") is None


async def test_the_latest_click_of_each_user_counts(store: ConversationStore) -> None:
    reply_id = await answer(store, "An answer.", "C1:1.0")
    feedback = Feedback(store, Metrics())
    for user, value in (("U1", GOOD), ("U2", BAD), ("U1", BAD), ("U2", GOOD)):
        assert await feedback.record(Click("slack", "C1:1.0", user, reply_id, value))

    assert await store.latest_feedback([reply_id, reply_id + 99]) == {reply_id: {"U1": -1, "U2": 1}}


async def test_a_click_from_another_message_or_platform_does_not_count(
    store: ConversationStore,
) -> None:
    first = await answer(store, "First.", "C1:1.0")
    await answer(store, "Second.", "C1:2.0")
    feedback = Feedback(store, Metrics())

    assert await feedback.record(Click("slack", "C1:2.0", "U1", first, GOOD)) is None
    assert await feedback.record(Click("discord", "C1:1.0", "U1", first, GOOD)) is None
    assert await feedback.record(Click("slack", "C1:1.0", "U1", first + 99, GOOD)) is None
    assert await store.latest_feedback([first]) == {}


async def test_rating_the_last_answer_names_it(store: ConversationStore) -> None:
    feedback = Feedback(store, Metrics())
    assert await feedback.rate_last(KEY, "U1", GOOD) is None
    await answer(store, "Old.", "C1:1.0")
    latest = await answer(store, "New.", "C1:2.0")

    rated = await feedback.rate_last(KEY, "U1", BAD, "  too short  ")

    assert rated is not None and rated.id == latest and rated.content == "New."
    assert await store.feedback_reasons(latest) == ["too short"]


async def test_the_latest_click_counts_on_every_database(database_url: str) -> None:
    store = await ConversationStore.open(database_url)
    try:
        reply_id = await answer(store, "An answer.", "C1:1.0")
        feedback = Feedback(store, Metrics())
        for user, value in (("U1", GOOD), ("U1", BAD), ("U2", GOOD)):
            assert await feedback.record(Click("slack", "C1:1.0", user, reply_id, value))
        rated = await feedback.rate_last(KEY, "U3", BAD, "wrong")
        assert rated is not None and rated.id == reply_id
        assert await store.latest_feedback([reply_id]) == {reply_id: {"U1": -1, "U2": 1, "U3": -1}}
        assert await store.feedback_reasons(reply_id) == ["wrong"]
    finally:
        await store.close()
