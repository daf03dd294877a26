"""Stop and Regenerate on Discord answers, through the fake's gateway and REST: the Stop button
while an answer streams, the Regenerate button next to the feedback buttons and the
"Regenerate" message command, each click acknowledged before any work, nothing pinging anyone,
and buttons an earlier process posted still working."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from bots.discord.client import NOT_AN_ANSWER
from bots.discord.controls import REGENERATE_PREFIX, STOP_PREFIX
from bots.discord.feedback import CUSTOM_ID_PREFIX
from core.store import MessageRow
from core.streaming import RETRACTED_TEXT
from tests.wire.discord.harness import GIVE_UP_AFTER, RunningBot, running_bot
from tests.wire.discord.server import FakeDiscord, FakeMessage

#: Discord's interaction callback types: a deferred update (component clicks) and a deferred
#: answer ("thinking", app commands).
DEFERRED_UPDATE = 6
DEFERRED_ANSWER = 5
EPHEMERAL = 64


def control(message: FakeMessage, prefix: str) -> str | None:
    """The custom id of the button with ``prefix`` on ``message`` (None: no such button)."""
    found = [c for c in message.custom_ids() if c.startswith(prefix)]
    assert len(found) <= 1
    return found[0] if found else None


async def ask(bot: RunningBot, dm: int, question: str, answer: list[str]) -> FakeMessage:
    """Ask ``question`` in DM ``dm``; the last message of the answer once it has its buttons."""
    before = {m.id for m in bot.fake.bot_messages_in(dm)}
    bot.provider.enqueue(answer)
    await bot.fake.send_message(dm, question, mention=False)

    def new() -> list[FakeMessage]:
        return [m for m in bot.fake.bot_messages_in(dm) if m.id not in before]

    await bot.fake.wait_for(lambda: bool(new()) and bool(new()[-1].components), GIVE_UP_AFTER)
    await bot.settle()
    return new()[-1]


async def stored_answers(bot: RunningBot) -> list[tuple[str, str | None]]:
    """Every stored answer's text and status, oldest first."""
    query = (
        select(MessageRow.content, MessageRow.status)
        .where(MessageRow.role == "assistant")
        .order_by(MessageRow.id)
    )
    async with bot.engine.store.engine.connect() as conn:
        return [(row.content, row.status) for row in (await conn.execute(query)).all()]


def sent_history(bot: RunningBot) -> list[str]:
    """The texts of the last model request's messages."""
    return [m.content for m in bot.provider.requests[-1].messages]


async def test_regenerate_sits_with_the_feedback_buttons_and_answers_again_in_place(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        reply = await ask(bot, dm, "name a colour", ["Blue."])

        ids = reply.custom_ids()
        regenerate = control(reply, REGENERATE_PREFIX)
        assert regenerate is not None
        assert [c for c in ids if c.startswith(CUSTOM_ID_PREFIX)] == ids[:2]
        # Added with the feedback buttons by one edit that sends no text and pings no one.
        assert "content" not in reply.payloads[-1]
        assert reply.payloads[-1]["allowed_mentions"] == {"parse": []}

        bot.provider.enqueue(["Green."])
        token = await fake.click(reply.id, regenerate)
        await bot.answered(dm, "Green.")

        # The same message now shows the new answer; the click was acknowledged before that.
        assert [m.id for m in fake.bot_messages_in(dm)] == [reply.id]
        [first, *_] = fake.responses(token)
        assert first["type"] == DEFERRED_UPDATE
        assert first["at"] <= reply.times[reply.states.index("Green.")]
        assert fake.followups[token] == []
        # The same question was asked again, without the replaced answer.
        assert sent_history(bot)[-1] == "name a colour"
        assert "Blue." not in sent_history(bot)
        assert await stored_answers(bot) == [("Blue.", "replaced"), ("Green.", None)]
        # The new answer has its own buttons again.
        assert control(reply, REGENERATE_PREFIX) == regenerate
        assert all(
            p.get("allowed_mentions") == {"parse": []} for p in reply.payloads if "components" in p
        )

        await ask(bot, dm, "and another?", ["Red."])
        assert sent_history(bot) == ["name a colour", "Green.", "and another?"]


async def test_only_the_newest_answer_may_be_regenerated(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        older = await ask(bot, dm, "first question", ["First answer."])
        await ask(bot, dm, "second question", ["Second answer."])
        regenerate = control(older, REGENERATE_PREFIX)
        assert regenerate is not None
        requests = len(bot.provider.requests)

        token = await fake.click(older.id, regenerate)
        await fake.wait_for(lambda: bool(fake.followups[token]), GIVE_UP_AFTER)
        await bot.settle()

        [refusal] = fake.followup_bodies[token]
        assert refusal["content"] and refusal["flags"] & EPHEMERAL
        assert older.content == "First answer."
        assert len(bot.provider.requests) == requests
        assert await stored_answers(bot) == [("First answer.", None), ("Second answer.", None)]


async def test_the_regenerate_message_command_answers_again_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        question = await fake.send_message(fake.text_channel, "pick a number")
        thread = int(question["id"])
        await fake.wait_for(
            lambda: any(m.components for m in fake.bot_messages_in(thread)), GIVE_UP_AFTER
        )
        await bot.settle()
        [reply] = fake.bot_messages_in(thread)
        assert {c["name"]: c["type"] for c in fake.global_commands}["Regenerate"] == 3

        bot.provider.enqueue(["Seven."])
        token = await fake.context_menu("Regenerate", reply.id)
        await bot.answered(thread, "Seven.")
        await fake.wait_for(lambda: token in fake.originals_deleted, GIVE_UP_AFTER)

        [first, *_] = fake.responses(token)
        assert first["type"] == DEFERRED_ANSWER and first["data"]["flags"] & EPHEMERAL
        assert [m.id for m in fake.bot_messages_in(thread)] == [reply.id]
        assert [status for _, status in await stored_answers(bot)] == ["replaced", None]

        # On someone else's message it explains instead.
        mine = await fake.send_message(thread, "not an answer", mention=False)
        await bot.settle()
        refused = await fake.context_menu("Regenerate", int(mine["id"]))
        await fake.wait_for(lambda: fake.original_edits[refused] == [NOT_AN_ANSWER], GIVE_UP_AFTER)


async def test_stop_ends_a_streaming_answer_as_shown(tmp_path: Path) -> None:
    async with running_bot(tmp_path, provider_delay=0.02) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        words = [f"word{i} " for i in range(500)]
        bot.provider.enqueue(words)
        await fake.send_message(dm, "talk for a while", mention=False)

        def streaming() -> FakeMessage | None:
            live = [m for m in fake.bot_messages_in(dm) if control(m, STOP_PREFIX)]
            return live[0] if live else None

        await fake.wait_for(lambda: streaming() is not None, GIVE_UP_AFTER)
        message = streaming()
        assert message is not None
        stop = control(message, STOP_PREFIX)
        assert stop is not None
        # Every streaming state that carried Stop could ping no one.
        assert all(
            p.get("allowed_mentions") == {"parse": []}
            for p in message.payloads
            if p.get("components")
        )
        token = await fake.click(message.id, stop)
        await bot.settle()

        assert fake.responses(token)[0]["type"] == DEFERRED_UPDATE
        assert fake.followups[token] == []
        [(stored, status)] = await stored_answers(bot)
        assert status == "stopped"
        assert 0 < len(stored) < len("".join(words))
        assert "".join(words).startswith(stored)
        shown = fake.bot_messages_in(dm)
        # Kept as shown (and said so), no Stop left anywhere.
        assert shown[0].content.startswith(stored.rstrip()[:100])
        assert all(control(m, STOP_PREFIX) is None for m in shown)


async def test_stop_clicked_in_another_process_stops_the_answer_where_it_streams(
    tmp_path: Path,
) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with running_bot(tmp_path, fake=fake, provider_delay=0.02) as streaming:
            dm = fake.add_dm()
            words = [f"w{i} " for i in range(1000)]
            streaming.provider.enqueue(words)
            await fake.send_message(dm, "go on", mention=False)
            await fake.wait_for(
                lambda: any(control(m, STOP_PREFIX) for m in fake.bot_messages_in(dm)),
                GIVE_UP_AFTER,
            )
            message = next(m for m in fake.bot_messages_in(dm) if control(m, STOP_PREFIX))
            stop = control(message, STOP_PREFIX)
            assert stop is not None
            # A second process connects (the gateway now delivers to it) and gets the click.
            async with running_bot(tmp_path, fake=fake) as other:
                token = await fake.click(message.id, stop)
                await fake.wait_for(lambda: bool(fake.responses(token)), GIVE_UP_AFTER)
                await other.settle()
                await streaming.settle()
            assert fake.responses(token)[0]["type"] == DEFERRED_UPDATE
            assert fake.followups[token] == []
            [(stored, status)] = await stored_answers(streaming)
            assert status == "stopped"
            assert 0 < len(stored) < len("".join(words))
            assert all(control(m, STOP_PREFIX) is None for m in fake.bot_messages_in(dm))
    finally:
        await fake.close()


async def test_a_regenerate_button_posted_before_a_restart_still_works(tmp_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            dm = fake.add_dm()
            reply = await ask(bot, dm, "a question", ["Before the restart."])
        regenerate = control(reply, REGENERATE_PREFIX)
        assert regenerate is not None

        async with running_bot(tmp_path, fake=fake) as later:
            later.provider.enqueue(["After the restart."])
            await fake.click(reply.id, regenerate)
            await later.answered(dm, "After the restart.")
            assert [m.id for m in fake.bot_messages_in(dm)] == [reply.id]
            assert await stored_answers(later) == [
                ("Before the restart.", "replaced"),
                ("After the restart.", None),
            ]
    finally:
        await fake.close()


async def test_the_message_command_works_on_any_message_of_a_long_answer(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        dm = fake.add_dm()
        long_answer = ["word " * 150 + "end.\n\n"] * 4
        last = await ask(bot, dm, "tell me a lot", long_answer)
        first, *_ = fake.bot_messages_in(dm)
        assert first.id != last.id and not first.components

        bot.provider.enqueue(["Short now."])
        token = await fake.context_menu("Regenerate", first.id)
        await fake.wait_for(lambda: token in fake.originals_deleted, GIVE_UP_AFTER)
        await bot.settle()

        # The first message shows the new answer, the others are retracted; one message of
        # the reply carries the new answer's buttons, none carries Stop.
        assert first.content == "Short now."
        shown = fake.bot_messages_in(dm)
        assert all(m.content == RETRACTED_TEXT for m in shown if m.id != first.id)
        assert len([m for m in shown if control(m, REGENERATE_PREFIX)]) == 1
        assert all(control(m, STOP_PREFIX) is None for m in shown)
        assert [status for _, status in await stored_answers(bot)] == ["replaced", None]
