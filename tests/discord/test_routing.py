"""The shared routing table (``tests/routing_table.py``) through the Discord adapter and its wire
fake (gateway MESSAGE_CREATE in, REST out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.routing_table import CASES, MODEL_ANSWER, Case, outcome
from tests.wire.discord.harness import RunningBot, running_bot


async def scene(bot: RunningBot, case: Case) -> int:
    """Set the scene of ``case``: the channel its message goes to."""
    fake = bot.fake
    if case.where == "dm":
        return fake.add_dm()
    if case.where == "bot_thread":
        bot.provider.enqueue(["First answer."])
        question = await fake.send_message(fake.text_channel, "start a thread")
        # The thread opened on a message has the message's id.
        thread_id = int(question["id"])
        await bot.answered(thread_id, "First answer.")
        return thread_id
    if case.where == "other_thread":
        return fake.add_thread(fake.text_channel, "people talking")
    return fake.text_channel


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_discord_routes_as_the_table_says(tmp_path: Path, case: Case) -> None:
    env = {"REQUIRE_MENTION": "true"} if case.require_mention else {}
    async with running_bot(tmp_path, env=env) as bot:
        channel = await scene(bot, case)
        before = set(bot.fake.messages)
        # Two scripts: the marker's turn below may reach the model first.
        bot.provider.enqueue([MODEL_ANSWER], [MODEL_ANSWER])
        await bot.fake.send_message(
            channel,
            case.text,
            mention=case.mention == "user",
            mention_role=case.mention == "role",
        )
        # Once a DM sent after it is answered, the message has been handled (and settled).
        marker_dm = await bot.marker()
        replies = [
            m.content
            for m in bot.fake.messages.values()
            if m.id not in before
            and m.author["id"] == bot.fake.bot["id"]
            and m.channel_id != marker_dm
        ]
        assert outcome(replies) == case.expect
