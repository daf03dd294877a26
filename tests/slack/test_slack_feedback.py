"""Feedback on Slack answers: Slack's feedback buttons under the final message of each answer,
clicks as Slack posts them (signed ``block_actions``), the optional reason modal
(``views.open`` then ``view_submission``), a click after a restart, a forged value."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from bots.slack.formatting import (
    FEEDBACK_ACTION_ID,
    MAX_MARKDOWN_CHARS,
    REASON_ACTION_ID,
    REASON_BLOCK_ID,
    neutralise_mentions,
)
from core.feedback import MAX_REASON_CHARS
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import Harness, running_bot
from tests.wire.slack.server import Message

CHANNEL = "C0001"


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll an async ``condition`` until true (work the app does after acknowledging)."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def answered(h: Harness, answer: list[str]) -> tuple[str, list[Message]]:
    """Ask in the channel, wait for the answer; the thread and the bot's messages in it."""
    h.provider.enqueue(answer)
    ts = h.new_ts()
    await h.sender.mention("a question", ts=ts)
    await h.settle()
    return ts, h.fake.bot_messages(CHANNEL)


async def votes(h: Harness, reply_id: int) -> dict[str, int]:
    return (await h.engine.store.latest_feedback([reply_id])).get(reply_id, {})


def reply_id_of(message: Message) -> int:
    values = message.feedback_values()
    assert values is not None
    good, bad = values
    assert good.startswith("good:") and bad == "bad:" + good.removeprefix("good:")
    return int(good.removeprefix("good:"))


async def test_final_message_carries_the_buttons_and_the_exact_text(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.01) as h:
        answer = ["Here ", "is **bold** ", "and <@U_BOB> quietly."]
        _, [reply] = await answered(h, answer)

        assert reply.visible() == neutralise_mentions("".join(answer))
        assert reply.states[-1] == reply.states[-2]  # the buttons changed no text
        assert reply.block_types[-1] == ("markdown", "context_actions")
        # No state while streaming (nor the final text before the answer was stored) had them.
        assert all("context_actions" not in types for types in reply.block_types[:-1])
        reply_id = reply_id_of(reply)
        stored = await h.engine.store.rated_reply(reply_id)
        assert stored is not None and stored.content == "".join(answer)
        assert stored.platform_message_ids == (f"{CHANNEL}:{reply.ts}",)


async def test_a_long_answer_has_the_buttons_on_its_last_message_only(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        paragraph = "word " * 199 + "end.\n\n"
        answer = [paragraph] * (MAX_MARKDOWN_CHARS // len(paragraph) + 3)
        _, messages = await answered(h, answer)

        assert len(messages) == 2
        first, last = messages
        assert first.feedback_values() is None
        assert reply_id_of(last) > 0
        assert "".join(m.visible() for m in messages).split() == "".join(answer).split()


async def test_a_thumbs_up_is_stored_and_thanked(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        thread, [reply] = await answered(h, ["An answer."])
        reply_id = reply_id_of(reply)
        good, _ = reply.feedback_values() or ("", "")

        answer = await h.sender.click(
            good,
            action_id=FEEDBACK_ACTION_ID,
            channel=CHANNEL,
            message_ts=reply.ts,
            thread_ts=thread,
            response_url=h.fake.response_url("click"),
        )

        assert answer.status == 200
        await eventually(lambda: _has(votes(h, reply_id), {"U_ALICE": 1}))
        await h.settle()
        assert [r["text"] for r in h.fake.responded] == ["Thanks for the feedback."]
        assert h.fake.responded[0]["response_type"] == "ephemeral"
        assert feedback_counted(h) == {"good": 1.0}


async def test_thumbs_down_opens_the_optional_reason_and_the_latest_click_counts(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        thread, [reply] = await answered(h, ["An answer."])
        reply_id = reply_id_of(reply)
        good, bad = reply.feedback_values() or ("", "")
        click = {"action_id": FEEDBACK_ACTION_ID, "channel": CHANNEL, "message_ts": reply.ts}

        await h.sender.click(good, **click)
        await eventually(lambda: _has(votes(h, reply_id), {"U_ALICE": 1}))
        await h.sender.click(bad, **click, trigger_id="77.88.99")
        await eventually(lambda: _true(len(h.fake.views) == 1))
        # The thumbs-down counts at once, reason or not.
        assert await votes(h, reply_id) == {"U_ALICE": -1}
        trigger, view = h.fake.views[0]
        assert trigger == "77.88.99"
        reason_input = view["blocks"][0]
        assert reason_input["optional"] is True

        long_reason = "It missed the point. " * 100
        answer = await h.sender.submit_view(
            view, {REASON_BLOCK_ID: {REASON_ACTION_ID: long_reason}}
        )

        assert answer.status == 200
        await eventually(lambda: _has_reasons(h, reply_id))
        assert await h.engine.store.feedback_reasons(reply_id) == [
            long_reason.strip()[:MAX_REASON_CHARS]
        ]
        assert await votes(h, reply_id) == {"U_ALICE": -1}
        assert thread


async def test_a_button_posted_before_a_restart_still_counts(sqlite_url: str) -> None:
    async with FakeSlack(rate_scale=10.0) as fake:
        async with running_bot(sqlite_url, fake=fake) as h:
            _, [reply] = await answered(h, ["An answer."])
        reply_id = reply_id_of(reply)
        _, bad = reply.feedback_values() or ("", "")

        async with running_bot(sqlite_url, fake=fake) as later:
            await later.sender.click(
                bad,
                action_id=FEEDBACK_ACTION_ID,
                channel=CHANNEL,
                message_ts=reply.ts,
                user="U_BOB",
            )
            await eventually(lambda: _has(votes(later, reply_id), {"U_BOB": -1}))


async def test_a_forged_value_cannot_rate_another_answer(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        _, [first] = await answered(h, ["First answer."])
        _, messages = await answered(h, ["Second answer."])
        second = messages[-1]
        first_id = reply_id_of(first)

        # The button of the second answer, edited to name the first.
        await h.sender.click(
            f"good:{first_id}",
            action_id=FEEDBACK_ACTION_ID,
            channel=CHANNEL,
            message_ts=second.ts,
            response_url=h.fake.response_url("forged"),
        )

        await eventually(lambda: _true(bool(h.fake.responded)))
        assert h.fake.responded[0]["text"] == "That answer can't be rated from here."
        assert await h.engine.store.latest_feedback([first_id, reply_id_of(second)]) == {}


async def _has(found: Awaitable[dict[str, int]], expected: dict[str, int]) -> bool:
    return await found == expected


async def _true(value: bool) -> bool:
    return value


async def _has_reasons(h: Harness, reply_id: int) -> bool:
    return bool(await h.engine.store.feedback_reasons(reply_id))


def feedback_counted(h: Harness) -> dict[str, float]:
    """The feedback counter on Slack by value, as a Prometheus scrape reads it."""
    text = h.engine.metrics.exposition().decode()
    return {
        sample.labels["threadbot_value"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "threadbot_feedback_total"
        and sample.labels.get("threadbot_platform") == "slack"
    }
