"""Feedback on Discord answers: two buttons on the final message of each answer (never while it
streams, never a ping), clicks as Discord's gateway delivers them (component interactions), the
optional reason modal (a modal submit), a click on a button posted before a restart."""

from __future__ import annotations

from pathlib import Path

from bots.discord.feedback import CUSTOM_ID_PREFIX, THANKS
from core.feedback import MAX_REASON_CHARS
from tests.wire.discord.harness import GIVE_UP_AFTER, RunningBot, running_bot
from tests.wire.discord.server import FakeDiscord, FakeMessage


async def answered(bot: RunningBot, answer: list[str]) -> tuple[int, list[FakeMessage]]:
    """Ask in a new DM and wait for the answer; the DM and the bot's messages in it."""
    bot.provider.enqueue(answer)
    dm = bot.fake.add_dm()
    await bot.fake.send_message(dm, "a question", mention=False)
    await bot.fake.wait_for(lambda: bool(bot.fake.bot_messages_in(dm)), GIVE_UP_AFTER)
    await bot.settle()
    return dm, bot.fake.bot_messages_in(dm)


def buttons(message: FakeMessage) -> tuple[str, str, int]:
    """The custom ids of the thumbs up and down on ``message``, and the answer they name."""
    good, bad = [c for c in message.custom_ids() if c.startswith(CUSTOM_ID_PREFIX)]
    reply_id = int(good.removeprefix(CUSTOM_ID_PREFIX + "good:"))
    assert bad == f"{CUSTOM_ID_PREFIX}bad:{reply_id}"
    return good, bad, reply_id


async def votes(bot: RunningBot, reply_id: int) -> dict[str, int]:
    return (await bot.engine.store.latest_feedback([reply_id])).get(reply_id, {})


async def test_the_final_message_gets_the_buttons_and_keeps_its_text(tmp_path: Path) -> None:
    async with running_bot(tmp_path, provider_delay=0.01) as bot:
        answer = ["Here ", "is the ", "answer, @everyone."]
        _, [reply] = await answered(bot, answer)

        assert reply.content == "".join(answer)
        *streaming, last = reply.payloads
        # Streaming states carry no feedback buttons (only Stop, bots.discord.controls).
        streamed = [
            item["custom_id"]
            for payload in streaming
            for row in payload.get("components") or ()
            for item in row["components"]
        ]
        assert not any(custom_id.startswith(CUSTOM_ID_PREFIX) for custom_id in streamed)
        # The buttons came in an edit of their own that sent no text and may ping nobody.
        assert "content" not in last
        assert last["allowed_mentions"] == {"parse": []}
        _, _, reply_id = buttons(reply)
        stored = await bot.engine.store.rated_reply(reply_id)
        assert stored is not None and stored.content == "".join(answer)


async def test_a_long_answer_has_the_buttons_on_its_last_message_only(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        answer = ["word " * 150 + "end.\n\n"] * 4
        _, messages = await answered(bot, answer)

        assert len(messages) >= 2
        assert all(not m.components for m in messages[:-1])
        assert buttons(messages[-1])


async def test_a_thumbs_up_is_answered_privately_and_stored(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        _, [reply] = await answered(bot, ["An answer."])
        good, _, reply_id = buttons(reply)

        token = await bot.fake.click(reply.id, good)

        await bot.fake.wait_for(lambda: bool(bot.fake.followups[token]), GIVE_UP_AFTER)
        assert bot.fake.followups[token] == [THANKS]
        [callback] = [c for c in bot.fake.callbacks if c["token"] == token]
        assert callback["type"] == 5 and callback["data"]["flags"] & 64  # deferred, ephemeral
        assert await votes(bot, reply_id) == {bot.fake.owner["id"]: 1}


async def test_thumbs_down_opens_the_reason_modal_and_the_reason_is_kept(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        _, [reply] = await answered(bot, ["An answer."])
        good, bad, reply_id = buttons(reply)
        await bot.fake.click(reply.id, good)
        await bot.fake.wait_for(lambda: bool(bot.fake.followups), GIVE_UP_AFTER)

        token = await bot.fake.click(reply.id, bad)
        await bot.fake.wait_for(lambda: bot.fake.modal_opened(token) is not None, GIVE_UP_AFTER)
        user = bot.fake.owner["id"]
        reason = "Wrong about the dates. " * 60
        submit = await bot.fake.submit_modal(token, {"reason": reason})

        await bot.fake.wait_for(lambda: bot.fake.original_edits[submit] == [THANKS], GIVE_UP_AFTER)
        assert await votes(bot, reply_id) == {user: -1}
        assert await bot.engine.store.feedback_reasons(reply_id) == [
            reason.strip()[:MAX_REASON_CHARS]
        ]


async def test_a_button_posted_before_a_restart_still_counts(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            _, [reply] = await answered(bot, ["An answer."])
        good, _, reply_id = buttons(reply)

        async with running_bot(tmp_path, fake=fake) as later:
            token = await fake.click(reply.id, good)
            await fake.wait_for(lambda: fake.followups[token] == [THANKS], GIVE_UP_AFTER)
            assert await votes(later, reply_id) == {fake.owner["id"]: 1}
    finally:
        await fake.close()
