"""Stopping an answer from Slack's agent-session stop button, and how answers stream where
(issue 14). The real Bolt app over HTTP, the real AsyncWebClient against the fake Slack."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.conversation import ConversationKey
from core.outcomes import STOPPED_NOTE
from core.store import ConversationStore, MessageRow, TurnRow
from tests.wire.slack.harness import Harness, demo, running_bot, until

CHANNEL = "C0001"
DM = "D0001"
LONG = [f"word{n} " for n in range(400)]


async def stored(
    store: ConversationStore, key: ConversationKey
) -> tuple[list[str | None], list[str]]:
    """The statuses of the conversation's stored assistant messages (None: a whole answer), and
    of its turns."""
    conversation = await store.find(key)
    assert conversation is not None
    async with store.engine.connect() as conn:
        messages = await conn.execute(
            select(MessageRow.status)
            .where(MessageRow.conversation_id == conversation.id, MessageRow.role == "assistant")
            .order_by(MessageRow.id)
        )
        turns = await conn.execute(
            select(TurnRow.status)
            .where(TurnRow.conversation_id == conversation.id)
            .order_by(TurnRow.id)
        )
        return [s for (s,) in messages], [str(s) for (s,) in turns]


async def test_the_stop_button_stops_the_answer_where_it_is(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.02) as h:
        h.provider.enqueue(LONG)
        ts = h.new_ts()
        await h.sender.mention("talk a lot", ts=ts)
        await until(lambda: "word5 " in h.fake.thread_text(CHANNEL, ts))
        await until(lambda: h.fake.session_status(CHANNEL, ts) == "processing")

        # The click, and Slack's redelivery of the same event: acknowledged, one stop.
        answers = [
            await h.sender.agent_session_stopped(
                channel=CHANNEL, thread_ts=ts, event_id="EvStop1", **retry
            )
            for retry in ({}, {"retry_num": 1})
        ]
        assert [a.status for a in answers] == [200, 200]
        await h.settle()

        text = h.fake.thread_text(CHANNEL, ts)
        # Kept as shown, with the note once; the rest never came.
        assert text.endswith(STOPPED_NOTE) and text.count(STOPPED_NOTE) == 1
        assert text.startswith("word0 word1 word2 word3 word4 word5 ")
        assert "word399" not in text
        key = ConversationKey("slack", "T0001", CHANNEL, ts)
        assert await stored(h.engine.store, key) == (["stopped"], ["stopped"])
        # The session left "processing" once the answer ended.
        assert h.fake.session_status(CHANNEL, ts) == "active"


async def test_a_stop_from_someone_the_bot_does_not_answer_is_ignored(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.02, blocked_users=("U_MALLORY",)) as h:
        h.provider.enqueue(LONG[:100])
        ts = h.new_ts()
        await h.sender.mention("a question", ts=ts)
        await until(lambda: "word5 " in h.fake.thread_text(CHANNEL, ts))
        await h.sender.agent_session_stopped(channel=CHANNEL, thread_ts=ts, user="U_MALLORY")
        await h.settle()
        assert h.fake.thread_text(CHANNEL, ts) == "".join(LONG[:100])
        key = ConversationKey("slack", "T0001", CHANNEL, ts)
        assert await stored(h.engine.store, key) == ([None], ["answered"])


async def test_a_stop_with_nothing_streaming_only_ends_the_session(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        ts = h.new_ts()
        await h.sender.mention("short", ts=ts)
        await h.settle()
        assert h.fake.thread_text(CHANNEL, ts) == demo("short")
        answer = await h.sender.agent_session_stopped(channel=CHANNEL, thread_ts=ts)
        assert answer.status == 200
        await h.settle()
        # The answer stays whole and answered; the session is active.
        assert h.fake.thread_text(CHANNEL, ts) == demo("short")
        key = ConversationKey("slack", "T0001", CHANNEL, ts)
        assert await stored(h.engine.store, key) == ([None], ["answered"])
        assert h.fake.session_status(CHANNEL, ts) == "active"


async def test_the_stop_button_in_a_dm_thread(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.02, streaming="auto") as h:
        h.provider.enqueue(LONG)
        thread = h.new_ts()
        await h.sender.message(
            "talk a lot", channel=DM, channel_type="im", ts=h.new_ts(), thread_ts=thread
        )
        await until(lambda: "word5 " in h.fake.thread_text(DM, thread))
        await h.sender.agent_session_stopped(channel=DM, thread_ts=thread)
        await h.settle()
        text = h.fake.thread_text(DM, thread)
        assert text.endswith(STOPPED_NOTE) and "word399" not in text
        key = ConversationKey("slack", "T0001", DM, "")
        assert await stored(h.engine.store, key) == (["stopped"], ["stopped"])


# -- where answers stream natively -----------------------------------------------------------


async def answer_in_dm_thread_and_channel_thread(h: Harness) -> tuple[set[str], set[str]]:
    """The Slack methods that wrote one answer in a DM thread and one in a channel thread."""
    answer = ["Here ", "is ", "an ", "answer ", "in ", "a ", "few ", "words."]
    h.provider.enqueue(answer, answer)

    def writes() -> set[str]:
        methods = ("chat.postMessage", "chat.update", "chat.startStream", "chat.stopStream")
        return {c.method for c in h.fake.calls_in_order(*methods)}

    thread = h.new_ts()
    await h.sender.message(
        "in a DM", channel=DM, channel_type="im", ts=h.new_ts(), thread_ts=thread
    )
    await h.settle()
    assert h.fake.thread_text(DM, thread) == "".join(answer)
    in_dm = writes()
    h.fake.calls.clear()
    ts = h.new_ts()
    await h.sender.mention("in a channel", ts=ts)
    await h.settle()
    assert h.fake.thread_text(CHANNEL, ts) == "".join(answer)
    return in_dm, writes()


async def test_auto_streams_natively_in_a_dm_and_with_edits_in_a_channel(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, streaming="auto", provider_delay=0.02) as h:
        in_dm, in_channel = await answer_in_dm_thread_and_channel_thread(h)
        # The asker alone reads a DM: Slack's native stream. A channel's members would see a
        # native stream only when it stops: posted and edited there.
        assert "chat.startStream" in in_dm and "chat.stopStream" in in_dm
        assert "chat.startStream" not in in_channel
        assert "chat.postMessage" in in_channel


@pytest.mark.parametrize(("mode", "native"), [("native", True), ("update", False)])
async def test_slack_streaming_still_forces_either(
    sqlite_url: str, mode: str, native: bool
) -> None:
    async with running_bot(sqlite_url, streaming=mode, provider_delay=0.02) as h:
        in_dm, in_channel = await answer_in_dm_thread_and_channel_thread(h)
        assert ("chat.startStream" in in_dm) is native
        assert ("chat.startStream" in in_channel) is native


async def test_a_channel_chooses_its_streaming(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, streaming="auto", provider_delay=0.02) as h:
        h.fake.users["U_ALICE"] = {"id": "U_ALICE", "is_admin": True}
        answer = await h.sender.command("/chatbot", "streaming native")
        assert answer.status == 200 and "native" in answer.json["text"]
        _, in_channel = await answer_in_dm_thread_and_channel_thread(h)
        assert "chat.startStream" in in_channel


async def test_a_message_at_the_top_of_a_dm_is_answered_without_a_stream(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, streaming="native", provider_delay=0.02) as h:
        h.provider.enqueue(["An ", "answer ", "at ", "the ", "top."])
        await h.sender.message("hello", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        # Slack streams only as a reply in a thread: posted (and edited) at the top instead.
        [reply] = h.fake.bot_messages(DM)
        assert reply.thread_ts is None and reply.visible() == "An answer at the top."
        assert h.fake.calls_to("chat.startStream") == []
