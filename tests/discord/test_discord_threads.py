"""Discord points 1-3 on the real discord.py against the fake: mention -> thread, follow-ups in
the thread without a mention (unless required), and DMs as one conversation."""

from __future__ import annotations

from pathlib import Path

from bots.discord.client import MAX_THREAD_NAME_CHARS, thread_name
from core.streaming import STREAMING_INDICATOR
from tests.wire.discord.harness import running_bot
from tests.wire.discord.server import FakeDiscord


async def test_mention_in_channel_opens_thread_named_after_question_and_streams(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path, provider_delay=0.2) as bot:
        fake = bot.fake
        bot.provider.enqueue(["Use ", "`git reset --soft HEAD~1`", " to keep ", "the changes."])
        question = await fake.send_message(fake.text_channel, "how do I undo my last commit?")
        # The thread started on the message has the message's id.
        thread_id = int(question["id"])
        # A partial state with the streaming indicator shows up before the answer is complete.
        await fake.wait_for(
            lambda: any(
                s.endswith(STREAMING_INDICATOR) and s.startswith("Use ")
                for m in fake.bot_messages_in(thread_id)
                for s in m.states
            )
        )
        await bot.answered(thread_id, "Use `git reset --soft HEAD~1` to keep the changes.")

        assert fake.channels[thread_id]["name"] == "how do I undo my last commit?"
        assert fake.channels[thread_id]["parent_id"] == str(fake.text_channel)
        replies = fake.bot_messages_in(thread_id)
        assert len(replies) == 1
        assert len(replies[0].states) >= 3  # first shown, streamed, final
        # Nothing was posted in the channel itself; the mention text was not sent to the model.
        assert fake.bot_messages_in(fake.text_channel) == []
        assert bot.provider.requests[0].messages[-1].content == "how do I undo my last commit?"


async def test_thread_name_is_trimmed_to_discord_limit(tmp_path: Path) -> None:
    long_question = "why " * 60 + "is the sky blue?"
    assert len(thread_name(long_question)) == MAX_THREAD_NAME_CHARS
    assert thread_name("  two\nlines  ") == "two lines"
    async with running_bot(tmp_path) as bot:
        bot.provider.enqueue(["Rayleigh scattering."])
        question = await bot.fake.send_message(bot.fake.text_channel, long_question)
        await bot.answered(int(question["id"]), "Rayleigh scattering.")
        name = bot.fake.channels[int(question["id"])]["name"]
        assert len(name) <= MAX_THREAD_NAME_CHARS
        assert name.startswith("why why")


async def test_follow_up_in_thread_continues_without_mention(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        bot.provider.enqueue(["Paris."], ["About 2.1 million."])
        first = await fake.send_message(fake.text_channel, "capital of France?")
        thread_id = int(first["id"])
        await bot.answered(thread_id, "Paris.")
        await fake.send_message(thread_id, "and its population?", mention=False)
        await bot.answered(thread_id, "About 2.1 million.")

        second = bot.provider.requests[1].messages
        assert [m.content for m in second] == [
            "capital of France?",
            "Paris.",
            "and its population?",
        ]


async def test_require_mention_keeps_thread_quiet_until_mentioned(tmp_path: Path) -> None:
    async with running_bot(tmp_path, env={"REQUIRE_MENTION": "true"}) as bot:
        fake = bot.fake
        bot.provider.enqueue(["Paris."])
        first = await fake.send_message(fake.text_channel, "capital of France?")
        thread_id = int(first["id"])
        await bot.answered(thread_id, "Paris.")
        await fake.send_message(thread_id, "are you sure?", mention=False)
        await bot.marker()
        assert len(fake.bot_messages_in(thread_id)) == 1

        bot.provider.enqueue(["Still Paris."])
        await fake.send_message(thread_id, "are you sure?")
        await bot.answered(thread_id, "Still Paris.")


async def test_unmentioned_message_in_unknown_thread_is_ignored(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        thread_id = fake.add_thread(fake.text_channel, "people talking")
        await fake.dispatch("THREAD_CREATE", {**fake.channels[thread_id], "newly_created": True})
        await fake.send_message(thread_id, "what do you all think?", mention=False)
        await bot.marker()
        assert fake.bot_messages_in(thread_id) == []
        assert [r.messages[-1].content for r in bot.provider.requests] == ["marker"]


async def test_mention_inside_existing_thread_answers_there_with_its_context(
    tmp_path: Path,
) -> None:
    fake = FakeDiscord()
    await fake.start()
    thread_id = fake.add_thread(fake.text_channel, "deploy plans")
    fake.user_message(thread_id, "we deploy on Fridays", mention=False)
    fake.user_message(thread_id, "is that wise?", mention=False)
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            bot.provider.enqueue(["Friday deploys are risky."])
            await fake.send_message(thread_id, "what do you think?")
            await bot.answered(thread_id, "Friday deploys are risky.")
            sent = [m.content for m in bot.provider.requests[0].messages]
            assert sent[-1] == "what do you think?"
            assert any("we deploy on Fridays" in c for c in sent[:-1])
            assert any("is that wise?" in c for c in sent[:-1])
            # No new thread was opened for a mention inside a thread.
            assert fake.requests["POST thread"] == 0
    finally:
        await fake.close()


async def test_mention_in_forum_post_answers_in_the_post(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    forum = fake.add_forum("help-forum")
    post = fake.add_thread(forum, "Build fails on CI")
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            bot.provider.enqueue(["Pin your Python version."])
            await fake.send_message(post, "any idea?")
            await bot.answered(post, "Pin your Python version.")
            assert fake.requests["POST thread"] == 0
            # Follow-ups in the forum post continue without a mention.
            bot.provider.enqueue(["3.11 is fine."])
            await fake.send_message(post, "which one?", mention=False)
            await bot.answered(post, "3.11 is fine.")
    finally:
        await fake.close()


async def test_every_dm_message_is_a_turn_of_one_conversation(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        bot.provider.enqueue(["Hello!"], ["You said hi."])
        await fake.send_message(dm, "hi", mention=False)
        await bot.answered(dm, "Hello!")
        await fake.send_message(dm, "what did I say?", mention=False)
        await bot.answered(dm, "You said hi.")
        second = [m.content for m in bot.provider.requests[1].messages]
        assert second == ["hi", "Hello!", "what did I say?"]
        assert fake.requests["POST thread"] == 0
