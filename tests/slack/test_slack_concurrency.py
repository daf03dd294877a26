"""Twenty conversations streaming at once in one workspace: every reply lands complete, and the
shared budgets keep every Slack method under its limit (the fake answers 429 past it).

Slack's minute runs 30 times faster here: the bot's budgets and the fake's limits are scaled
alike (``rate_scale``). ``bench/slack_concurrency.py`` runs the same at Slack's real rates.
"""

from __future__ import annotations

import asyncio

import pytest

from core.conversation import ChatMessage
from core.providers.offline import demo_answer
from tests.wire.slack.harness import running_bot

CONVERSATIONS = 20
CHANNELS = 5


@pytest.mark.parametrize("mode", ["update", "native", "auto"])
async def test_twenty_conversations_stream_at_once_without_a_429(
    sqlite_url: str, mode: str
) -> None:
    # One fake user asks all twenty: the per-user message rate is not what this measures.
    async with running_bot(
        sqlite_url,
        streaming=mode,
        rate_scale=30,
        provider_delay=0.005,
        user_messages_per_minute=0,
    ) as h:
        questions = {}
        for n in range(CONVERSATIONS):
            channel = f"C{n % CHANNELS + 1:04d}"
            questions[(channel, h.new_ts())] = f"question number {n}"
        await asyncio.gather(
            *(
                h.sender.mention(text, channel=channel, ts=ts)
                for (channel, ts), text in questions.items()
            )
        )
        await h.settle()

        for (channel, ts), text in questions.items():
            expected = "".join(demo_answer([ChatMessage("user", text)]))
            replies = h.fake.bot_messages(channel, ts)
            assert [m.visible() for m in replies] == [expected], (channel, ts)
            assert not any(m.streaming for m in replies)
        assert h.fake.ratelimited.total() == 0
        assert len(h.provider.requests) == CONVERSATIONS
        if mode == "update":
            assert h.fake.counts["chat.postMessage"] == CONVERSATIONS
        if mode == "native":
            # Each reply streams natively, or, when the whole answer was ready before Slack's
            # Tier 2 budget let its stream start, is posted complete in one message.
            starts, posts = h.fake.counts["chat.startStream"], h.fake.counts["chat.postMessage"]
            assert starts >= 3 and starts + posts == CONVERSATIONS
