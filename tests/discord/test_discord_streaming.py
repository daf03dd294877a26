"""Discord point 5: streaming through the streamer within Discord's limits — long answers split,
rate-limit headers fed to the budgets, real 429s survived, 20 conversations at once in different
channels and 5 at once in one channel."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import discord
import pytest

from bots.discord.surface import (
    MAX_MESSAGE_CHARS,
    DiscordReply,
    channel_scopes,
    rate_limit_trace,
    scope_key,
    translated_errors,
)
from core.conversation import ChatMessage
from core.errors import PermanentSurfaceError, SurfaceRateLimited, TransientSurfaceError
from core.providers.offline import demo_answer
from core.ratelimit import Budgets
from tests.wire.discord.harness import RunningBot, running_bot
from tests.wire.discord.server import BOT_TOKEN, FakeDiscord


def expected_demo(question: str) -> str:
    """The offline provider's answer to a first question (it quotes the question)."""
    return "".join(demo_answer([ChatMessage("user", question)]))


async def _all_answered(bot: RunningBot, replies: dict[int, str]) -> None:
    """Wait until each channel shows its expected final text."""
    fake = bot.fake
    await fake.wait_for(
        lambda: all(
            any(m.content == text for m in fake.bot_messages_in(cid))
            for cid, text in replies.items()
        ),
        give_up_after=60,
    )
    await bot.settle()


async def test_long_answer_continues_in_messages_split_outside_code(tmp_path: Path) -> None:
    prose = " ".join(f"word{i}" for i in range(300))  # ~2,400 characters
    code = "```python\n" + "\n".join(f"print({i})" for i in range(250)) + "\n```"
    answer = f"{prose}\n\n{code}\n\nThat is all."
    async with running_bot(tmp_path) as bot:
        fake = bot.fake
        bot.provider.enqueue([answer[i : i + 50] for i in range(0, len(answer), 50)])
        question = await fake.send_message(fake.text_channel, "a long one please")
        thread_id = int(question["id"])
        await fake.wait_for(
            lambda: any(m.content.endswith("That is all.") for m in fake.bot_messages_in(thread_id))
        )
        await bot.settle()
        messages = fake.bot_messages_in(thread_id)
        assert len(messages) >= 3
        for message in messages:
            assert 0 < len(message.content) <= MAX_MESSAGE_CHARS
            # Every message closes the code fences it opens.
            assert message.content.count("```") % 2 == 0
            assert all(len(state) <= MAX_MESSAGE_CHARS for state in message.states)
        joined = "\n".join(m.content for m in messages)
        for i in (0, 150, 299):
            assert f"word{i}" in joined
        for i in (0, 125, 249):
            assert f"print({i})" in joined


async def test_twenty_conversations_stream_at_once_in_different_channels(tmp_path: Path) -> None:
    # Discord's 5 s windows scaled down to 1 s to keep the test short (the bench uses 5 s).
    fake = FakeDiscord(window=1.0)
    await fake.start()
    try:
        # One fake user asks all twenty: the per-user message rate is not what this measures.
        quick = {"USER_MESSAGES_PER_MINUTE": "0"}
        async with running_bot(tmp_path, fake=fake, env=quick, provider_delay=0.005) as bot:
            channels = [fake.add_text_channel(f"room-{i}") for i in range(20)]
            for cid in channels:
                await fake.dispatch("CHANNEL_CREATE", fake.channels[cid])
            questions = {
                cid: f"question number {i} from room {i}" for i, cid in enumerate(channels)
            }
            sent = await asyncio.gather(*(fake.send_message(c, q) for c, q in questions.items()))
            threads = {
                int(m["id"]): expected_demo(questions[c])
                for m, c in zip(sent, channels, strict=True)
            }
            await _all_answered(bot, threads)
            for thread_id, text in threads.items():
                replies = fake.bot_messages_in(thread_id)
                assert [m.content for m in replies] == [text]
            assert fake.requests["POST thread"] == 20
            assert all(fake.bot_messages_in(c) == [] for c in channels)
    finally:
        await fake.close()


async def test_five_replies_at_once_in_one_channel(tmp_path: Path) -> None:
    fake = FakeDiscord(window=1.0)  # Discord's 5 s windows scaled down, as above
    await fake.start()
    # Without thread permission every reply goes to the channel itself: one shared edit bucket.
    fake.no_thread_permission.add(fake.text_channel)
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            questions = [f"parallel question {i}" for i in range(5)]
            sent = await asyncio.gather(
                *(fake.send_message(fake.text_channel, q) for q in questions)
            )
            expected = {
                int(m["id"]): expected_demo(q) for m, q in zip(sent, questions, strict=True)
            }
            await fake.wait_for(
                lambda: (
                    sorted(m.content for m in fake.bot_messages_in(fake.text_channel))
                    == sorted(expected.values())
                ),
                give_up_after=60,
            )
            await bot.settle()
            for message in fake.bot_messages_in(fake.text_channel):
                # Each reply answers the question it points at.
                assert message.reference is not None
                assert message.content == expected[message.reference]
            # The typing indicator stood in until text arrived: one message per reply, no 429.
            assert len(fake.bot_messages_in(fake.text_channel)) == 5
            assert fake.typing[fake.text_channel] >= 5
            assert fake.total_429s == 0
    finally:
        await fake.close()


async def test_429s_with_via_are_retried_by_discord_py_and_pause_the_scope(tmp_path: Path) -> None:
    budgets = Budgets()
    async with running_bot(tmp_path, budgets=budgets) as bot:
        fake = bot.fake
        bot.provider.enqueue(["Final ", "text."])
        payload = fake.user_message(fake.text_channel, "rate limit me")
        thread_id = int(payload["id"])
        # The reply's first call is its post (the typing indicator stood in until text).
        fake.force_429("post", thread_id, 2)
        await fake.dispatch("MESSAGE_CREATE", payload)
        await bot.answered(thread_id, "Final text.")
        assert fake.rate_limited["post"] == 2
        # The trace saw the 429s: the thread's post scope was paused (it exists and was used).
        budget = budgets.get(scope_key(thread_id, "post"))
        assert budget is not None and budget.granted >= 1


async def test_429_without_via_reaches_the_streamer_which_waits_and_lands(tmp_path: Path) -> None:
    fake = FakeDiscord(send_via_header=False)
    await fake.start()
    try:
        async with running_bot(tmp_path, fake=fake) as bot:
            bot.provider.enqueue(["Lands ", "anyway."])
            payload = fake.user_message(fake.text_channel, "no via")
            thread_id = int(payload["id"])
            fake.force_429("post", thread_id, 1)
            await fake.dispatch("MESSAGE_CREATE", payload)
            await bot.answered(thread_id, "Lands anyway.")
            assert fake.rate_limited["post"] == 1
    finally:
        await fake.close()


async def test_rate_limit_headers_and_429s_reach_the_budgets() -> None:
    # A bucket of one post per 30 s: after the first post, Discord says none remain.
    fake = FakeDiscord(post_limit=1, window=30.0)
    await fake.start()
    budgets = Budgets()
    channel = fake.text_channel
    post_scope = channel_scopes(channel, "post")[0]
    edit_scope = channel_scopes(channel, "edit")[0]
    # Budgets exist once a reply declared its scopes; the trace adjusts them.
    post_budget, edit_budget = budgets.budget(post_scope), budgets.budget(edit_scope)
    headers = {"Authorization": f"Bot {BOT_TOKEN}"}
    url = f"{fake.api_url}/channels/{channel}/messages"
    try:
        async with aiohttp.ClientSession(trace_configs=[rate_limit_trace(budgets)]) as session:
            async with session.post(url, json={"content": "one"}, headers=headers) as response:
                assert response.status == 200
                message_id = (await response.json())["id"]
            # X-RateLimit-Remaining: 0 with Reset-After ~30 s paused the scope far beyond its
            # declared pace of one post per second.
            assert post_budget.delay() > 5
            assert edit_budget.delay() == 0
            fake.force_429("edit", channel, 1)
            async with session.patch(
                f"{url}/{message_id}", json={"content": "two"}, headers=headers
            ) as response:
                assert response.status == 429
                retry_after = float(response.headers["Retry-After"])
            assert edit_budget.delay() == pytest.approx(retry_after, abs=0.5)
    finally:
        await fake.close()


async def test_typing_indicator_goes_to_the_channel(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as bot:
        channel = bot.client.get_channel(bot.fake.text_channel)
        assert isinstance(channel, discord.TextChannel)
        await DiscordReply(channel).show_typing()
        assert bot.fake.typing[bot.fake.text_channel] == 1


def _http_error(status: int, code: int = 0, headers: dict[str, str] | None = None) -> Exception:
    response = SimpleNamespace(status=status, reason="x", headers=headers or {})
    if status == 403:
        return discord.Forbidden(response, {"code": code, "message": "Missing Permissions"})  # type: ignore[arg-type]
    return discord.HTTPException(response, {"code": code, "message": "m"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "expected", "code"),
    [
        (_http_error(429, headers={"Retry-After": "2.5"}), SurfaceRateLimited, None),
        (_http_error(503), TransientSurfaceError, None),
        (_http_error(403, 50013), PermanentSurfaceError, "50013"),
        (_http_error(404, 10008), PermanentSurfaceError, "10008"),
        (_http_error(400, 50035), PermanentSurfaceError, "50035"),
        (discord.RateLimited(40.0), SurfaceRateLimited, None),
    ],
)
def test_discord_errors_translate_at_the_boundary(
    error: Exception, expected: type[Exception], code: str | None
) -> None:
    with pytest.raises(expected) as caught, translated_errors("discord:channel:1:edit"):
        raise error
    assert caught.value.__cause__ is error
    if isinstance(caught.value, SurfaceRateLimited):
        assert caught.value.retry_after in (2.5, 40.0)
        assert caught.value.scope == "discord:channel:1:edit"
    if isinstance(caught.value, PermanentSurfaceError):
        assert caught.value.code == code


#: What a proxy in front of Discord answers instead of Discord's JSON.
HTML_503 = "<html><head><title>503 Service Unavailable</title></head><body>busy</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected", "code"),
    [
        (503, HTML_503, "text/html", TransientSurfaceError, None),
        (503, "upstream connect error", "text/plain", TransientSurfaceError, None),
        # discord.py retries 500, 502, 504 and 524 itself (seconds apart); 520 it raises.
        (520, "", None, TransientSurfaceError, None),
        # A 429 that is not Discord's (no Via header): discord.py raises it at once.
        (429, "Too Many Requests", "text/plain", SurfaceRateLimited, None),
        (403, "<html>Forbidden</html>", "text/html", PermanentSurfaceError, "403"),
    ],
)
async def test_a_non_json_answer_from_discord_translates_by_its_status(
    tmp_path: Path,
    status: int,
    body: str,
    content_type: str | None,
    expected: type[Exception],
    code: str | None,
) -> None:
    async with running_bot(tmp_path) as bot:
        channel = bot.client.get_channel(bot.fake.text_channel)
        assert isinstance(channel, discord.TextChannel)
        reply = DiscordReply(channel)
        message_id = await reply.post("first")
        for request, call in (
            ("POST message", lambda: reply.post("second")),
            ("PATCH message", lambda: reply.edit(message_id, "edited")),
        ):
            bot.fake.answer_next(request, status, body, content_type=content_type)
            with pytest.raises(expected) as caught:
                await call()
            assert bot.fake.requests[f"{request} {status}"] == 1
            if isinstance(caught.value, PermanentSurfaceError):
                assert caught.value.code == code


async def test_a_streamed_answer_through_non_json_5xx_pages_still_lands(tmp_path: Path) -> None:
    async with running_bot(tmp_path, provider_delay=0.02) as bot:
        fake = bot.fake
        answer = [f"word{i} " for i in range(30)] + ["done."]
        bot.provider.enqueue(answer)
        fake.answer_next("POST message", 503, "upstream connect error", content_type="text/plain")
        fake.answer_next("PATCH message", 503, HTML_503, content_type="text/html")
        question = await fake.send_message(fake.text_channel, "through a proxy")
        thread_id = int(question["id"])
        await bot.answered(thread_id, "".join(answer))
        assert fake.requests["POST message 503"] == 1
        assert fake.requests["PATCH message 503"] == 1
        assert await bot.final_texts(thread_id) == ["".join(answer)]


async def test_a_streamed_answer_pings_nobody_on_posts_and_edits(tmp_path: Path) -> None:
    async with running_bot(tmp_path, provider_delay=0.02) as bot:
        fake = bot.fake
        member = fake.make_user("member")
        injected = f"Attention @everyone and @here, <@&{fake.bot_role_id}> and <@{member['id']}>: "
        answer = [injected, *(f"word{i} " for i in range(30)), "done."]
        bot.provider.enqueue(answer)
        question = await fake.send_message(fake.text_channel, "ping them all")
        thread_id = int(question["id"])
        await bot.answered(thread_id, "".join(answer))

        [reply] = fake.bot_messages_in(thread_id)
        # Posted once and edited while streaming: every payload suppresses every ping.
        assert len(reply.payloads) >= 2
        assert any("@everyone" in str(p.get("content")) for p in reply.payloads)
        for payload in reply.payloads:
            assert payload["allowed_mentions"] == {"parse": []}
