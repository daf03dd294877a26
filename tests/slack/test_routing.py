"""The shared routing table (``tests/routing_table.py``) through the Slack adapter and its wire fake."""

from __future__ import annotations

import pytest

from tests.routing_table import CASES, MODEL_ANSWER, Case, outcome
from tests.wire.slack.harness import Harness, running_bot

CHANNEL = "C0001"
DM = "D0001"


async def scene(h: Harness, case: Case) -> str | None:
    """Set the scene of ``case``: the thread its message goes into, if any."""
    if case.where == "bot_thread":
        thread_ts = h.new_ts()
        h.provider.enqueue(["First answer."])
        await h.sender.mention("start a thread", ts=thread_ts)
        await h.settle()
        return thread_ts
    if case.where == "other_thread":
        return h.fake.add_message(CHANNEL, "people talking", user="U_BOB").ts
    return None


async def deliver(h: Harness, case: Case, thread_ts: str | None) -> None:
    """Deliver the message of ``case`` as Slack would (a mention as app_mention + message)."""
    text, ts = case.text, h.new_ts()
    if case.where == "dm":
        await h.sender.message(text, channel=DM, channel_type="im", ts=ts)
    elif case.mention == "user":
        await h.sender.mention(text, ts=ts, thread_ts=thread_ts)
    else:
        await h.sender.message(text, ts=ts, thread_ts=thread_ts)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_slack_routes_as_the_table_says(sqlite_url: str, case: Case) -> None:
    if case.mention == "role":
        pytest.skip("Slack apps have no role of their own to mention")
    async with running_bot(sqlite_url, require_mention=case.require_mention) as h:
        thread_ts = await scene(h, case)
        before = len(h.fake.bot_messages())
        h.provider.enqueue([MODEL_ANSWER])
        await deliver(h, case, thread_ts)
        await h.settle()
        replies = [m.visible() for m in h.fake.bot_messages()[before:]]
        assert outcome(replies) == case.expect
