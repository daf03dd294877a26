"""The Slack bot end to end: the real Bolt app over HTTP, signed requests as Slack sends them, the
real AsyncWebClient against the fake Slack Web API, the engine on a temp SQLite file with the
offline provider. Each test names the point of issue 4 it covers."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bots.slack.formatting import WORD_JOINER
from core.bot import SHUTDOWN_NOTE
from core.engine import EMPTY_MESSAGE_HINT
from core.errors import TransientProviderError
from core.streaming import STREAMING_INDICATOR, THINKING_TEXT
from tests.wire.slack import FakeSlack
from tests.wire.slack.harness import Harness, running_bot

CHANNEL = "C0001"
DM = "D0001"


async def wait_for(condition: object, within: float = 20.0) -> None:
    """Poll ``condition()`` until true (state reached over the network, not a timing claim)."""
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def final_text(h: Harness, thread_ts: str, channel: str = CHANNEL) -> str:
    return h.fake.thread_text(channel, thread_ts)


def user_turns(h: Harness, request: int = -1) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in h.provider.requests[request].messages]


# -- 1. mention in a channel; mentioned inside an existing thread ------------------------------


async def test_mention_streams_the_answer_into_the_thread_under_it(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.01) as h:
        answer = ["Here ", "is **bold**, a list:\n\n", "- one\n- two\n\n", "[docs](https://x.io)"]
        h.provider.enqueue(answer)
        ts = h.new_ts()
        answers = await h.sender.mention("what is up?", ts=ts)
        assert [a.status for a in answers] == [200, 200]
        await h.settle()

        [reply] = h.fake.bot_messages(CHANNEL)
        assert reply.thread_ts == ts
        assert reply.visible() == "".join(answer)
        # It streamed: the thread's status while waiting (no placeholder message), then growing
        # text with the indicator, then the exact final text without it.
        [status] = h.fake.statuses
        assert (status.channel, status.thread_ts) == (CHANNEL, ts)
        assert status.at <= reply.times[0]
        assert THINKING_TEXT not in reply.states
        assert any(s.endswith(STREAMING_INDICATOR) for s in reply.states[:-1])
        assert len(reply.states) >= 2
        # Markdown goes to Slack as Markdown, in a markdown block, with a plain fallback.
        update = h.fake.calls_to("chat.update")[-1].args
        # The last update adds the feedback buttons after the same markdown block.
        assert update["blocks"][0] == {"type": "markdown", "text": "".join(answer)}
        assert [block["type"] for block in update["blocks"][1:]] == ["context_actions"]
        assert "**" not in update["text"]
        assert user_turns(h) == [("user", "what is up?")]


async def test_mention_inside_a_thread_is_seeded_with_the_thread(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        parent = h.fake.add_message(
            CHANNEL, "Deploy failed on step 3 &amp; I'm stuck", user="U_BOB", display_name="Bob"
        )
        h.fake.add_message(
            CHANNEL, "Logs say <https://l.io|disk full>", user="U_CAROL", thread_ts=parent.ts
        )
        # A reply of ours that never got past its placeholder is not context.
        h.fake.add_message(CHANNEL, THINKING_TEXT, user="UBOT", bot_id="BBOT", thread_ts=parent.ts)
        h.provider.enqueue(["Free some disk."], ["Then retry."])
        ts = h.new_ts()
        await h.sender.mention("what should we do?", ts=ts, thread_ts=parent.ts)
        await h.settle()

        assert user_turns(h) == [
            # Speakers by display name where Slack gives one, else by user id.
            ("user", "Bob: Deploy failed on step 3 & I'm stuck"),
            ("user", "U_CAROL: Logs say disk full (https://l.io)"),
            ("user", "what should we do?"),
        ]
        assert [m.visible() for m in h.fake.bot_messages(CHANNEL, parent.ts)][-1] == (
            "Free some disk."
        )
        # Later mentions in that thread continue the stored conversation: no second read.
        await h.sender.mention("and then?", ts=h.new_ts(), thread_ts=parent.ts)
        await h.settle()
        assert h.fake.counts["conversations.replies"] == 1
        assert user_turns(h)[-3:] == [
            ("user", "what should we do?"),
            ("assistant", "Free some disk."),
            ("user", "and then?"),
        ]


# -- 2. thread replies continue without a mention ---------------------------------------------


async def test_thread_reply_continues_without_a_mention(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["First answer."], ["Second answer."])
        ts = h.new_ts()
        await h.sender.mention("question one", ts=ts)
        await h.settle()
        await h.sender.message("and a follow-up", ts=h.new_ts(), thread_ts=ts)
        await h.settle()

        assert [m.visible() for m in h.fake.bot_messages(CHANNEL, ts)] == [
            "First answer.",
            "Second answer.",
        ]
        assert user_turns(h) == [
            ("user", "question one"),
            ("assistant", "First answer."),
            ("user", "and a follow-up"),
        ]


async def test_require_mention_keeps_thread_replies_silent(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, require_mention=True) as h:
        h.provider.enqueue(["First answer."])
        ts = h.new_ts()
        await h.sender.mention("question one", ts=ts)
        await h.settle()
        await h.sender.message("people talking in the thread", ts=h.new_ts(), thread_ts=ts)
        await h.settle()
        assert len(h.provider.requests) == 1
        assert len(h.fake.bot_messages(CHANNEL, ts)) == 1


# -- 3. direct messages ---------------------------------------------------------------------


async def test_every_dm_is_a_turn_of_one_conversation_until_reset(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["Hi Alice."], ["You said hello."], ["Fresh start."])
        await h.sender.message("hello", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        await h.sender.message("what did I say?", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        assert user_turns(h) == [
            ("user", "hello"),
            ("assistant", "Hi Alice."),
            ("user", "what did I say?"),
        ]
        # Answers go at the top level of the DM, not into threads.
        assert [m.thread_ts for m in h.fake.bot_messages(DM)] == [None, None]

        await h.sender.message("reset", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        assert "Conversation reset" in h.fake.bot_messages(DM)[-1].visible()
        await h.sender.message("again", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        assert user_turns(h) == [("user", "again")]


# -- 4. slash command, and commands after a mention inside a thread ---------------------------


async def test_slash_command_in_a_channel_sets_the_default_for_new_threads(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        # Changing a channel's defaults takes a workspace admin (tests/slack/test_access.py).
        h.fake.users["U_ALICE"] = {"id": "U_ALICE", "is_admin": True}
        answer = await h.sender.command("/chatbot", "system Answer like a pirate.")
        assert answer.status == 200
        assert answer.json["response_type"] == "ephemeral"
        assert "Answer like a pirate." in answer.json["text"]
        shown = await h.sender.command("/chatbot", "system")
        assert "this channel:" in shown.json["text"] and "pirate" in shown.json["text"]

        h.provider.enqueue(["Arr."])
        await h.sender.mention("hello", ts=h.new_ts())
        await h.settle()
        assert h.provider.requests[-1].system == "Answer like a pirate."

        cleared = await h.sender.command("/chatbot", "system clear")
        assert "cleared" in cleared.json["text"]
        h.provider.enqueue(["Hello."])
        await h.sender.mention("hello again", ts=h.new_ts())
        await h.settle()
        assert h.provider.requests[-1].system == h.bot.settings.system_prompt
        # Nothing of the commands was posted to the channel: they are ephemeral.
        assert h.fake.counts["chat.postEphemeral"] == 0
        assert all(m.thread_ts for m in h.fake.bot_messages(CHANNEL))


async def test_slash_command_history_sets_the_channel_window(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.fake.users["U_ALICE"] = {"id": "U_ALICE", "is_admin": True}
        answer = await h.sender.command("/chatbot", "history count 2")
        assert answer.json["response_type"] == "ephemeral"
        assert "newest 2 messages" in answer.json["text"]
        h.provider.enqueue(["One."], ["Two."])
        first = h.new_ts()
        await h.sender.mention("first", ts=first)
        await h.settle()
        await h.sender.message("second", ts=h.new_ts(), thread_ts=first)
        await h.settle()
        assert [m.content for m in h.provider.requests[-1].messages] == ["second"]
        wrong = await h.sender.command("/chatbot", "history count many")
        assert "not a number of messages" in wrong.json["text"]


async def test_slash_command_help_and_unknown_words_show_help(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, slack_command="/askbot") as h:
        for text in ("help", "", "what is this"):
            answer = await h.sender.command("/askbot", text)
            assert answer.json["response_type"] == "ephemeral"
            assert "/askbot reset" in answer.json["text"]
        # Another command name is not ours.
        other = await h.sender.command("/chatbot", "help")
        assert other.status == 404


async def test_slash_command_in_a_dm_acts_on_the_dm_conversation(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["One."], ["Two."])
        await h.sender.message("hello", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        answer = await h.sender.command(
            "/chatbot", "system Be brief.", channel=DM, channel_name="directmessage"
        )
        assert "this conversation" in answer.json["text"]
        reset = await h.sender.command(
            "/chatbot", "reset", channel=DM, channel_name="directmessage"
        )
        assert "Conversation reset" in reset.json["text"]
        await h.sender.message("hello again", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        assert user_turns(h) == [("user", "hello again")]
        assert h.provider.requests[-1].system == "Be brief."


async def test_slow_slash_command_is_acked_then_answered_through_response_url(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url, command_ack_budget=0.0) as h:
        answer = await h.sender.command("/chatbot", "help", response_url=h.fake.response_url("c1"))
        assert (answer.status, answer.body) == (200, "")
        await h.settle()
        [responded] = h.fake.responded
        assert responded["_name"] == "c1"
        assert responded["response_type"] == "ephemeral"
        assert "/chatbot reset" in responded["text"]


async def test_mention_reset_inside_a_thread_resets_that_thread(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["First."], ["After reset."])
        ts = h.new_ts()
        await h.sender.mention("remember 42", ts=ts)
        await h.settle()
        await h.sender.mention("reset", ts=h.new_ts(), thread_ts=ts)
        await h.settle()
        assert "Conversation reset" in h.fake.bot_messages(CHANNEL, ts)[-1].visible()
        assert len(h.provider.requests) == 1
        await h.sender.mention("what number?", ts=h.new_ts(), thread_ts=ts)
        await h.settle()
        assert user_turns(h) == [("user", "what number?")]


# -- 5. streaming: native, fallback, long answers ---------------------------------------------


async def test_native_streaming_appends_and_lands_the_exact_text(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, streaming="native", provider_delay=0.01) as h:
        answer = ["Native ", "streaming ", "works.\n\n", "```sh\nls -la\n```"]
        h.provider.enqueue(answer)
        ts = h.new_ts()
        await h.sender.mention("stream it", ts=ts)
        await h.settle()

        [reply] = h.fake.bot_messages(CHANNEL, ts)
        assert reply.visible() == "".join(answer)
        assert not reply.streaming
        assert reply.recipient == ("T0001", "U_ALICE")
        assert h.fake.counts["chat.startStream"] == 1
        assert h.fake.counts["chat.stopStream"] == 1
        assert h.fake.counts["chat.appendStream"] >= 1
        assert h.fake.counts["chat.postMessage"] == 0


#: What a proxy or load balancer in front of Slack answers instead of Slack's JSON.
HTML_503 = "<html><head><title>503 Service Unavailable</title></head><body>busy</body></html>"


async def test_a_thread_read_answered_by_a_plain_text_502_still_gets_its_answer(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        parent = h.fake.add_message(CHANNEL, "Deploy failed", user="U_BOB")
        h.fake.answer_next(
            "conversations.replies", 502, "502 Bad Gateway", content_type="text/plain"
        )
        h.provider.enqueue(["Answered without the thread."])
        ts = h.new_ts()
        await h.sender.mention("what now?", ts=ts, thread_ts=parent.ts)
        await h.settle()

        assert h.fake.calls_to("conversations.replies")[0].status == 502
        assert final_text(h, parent.ts) == "Answered without the thread."
        assert user_turns(h) == [("user", "what now?")]


@pytest.mark.parametrize("persistent", [False, True])
async def test_a_native_stream_answered_by_html_503s_ends_with_the_exact_text(
    sqlite_url: str, persistent: bool
) -> None:
    async with running_bot(sqlite_url, streaming="native", provider_delay=0.02) as h:
        answer = [f"word{i} " for i in range(40)] + ["survive a proxy's error pages."]
        h.provider.enqueue(answer)
        h.fake.answer_next("chat.appendStream", 503, HTML_503, content_type="text/html")
        # Persistent: every stop fails (the streamer's attempts run out) and chat.update lands it.
        times = 10 if persistent else 1
        h.fake.answer_next("chat.stopStream", 503, HTML_503, content_type="text/html", times=times)
        ts = h.new_ts()
        await h.sender.mention("stream it", ts=ts)
        await h.settle()

        [reply] = h.fake.bot_messages(CHANNEL, ts)
        assert reply.visible() == "".join(answer)
        assert h.fake.counts["chat.startStream"] == 1
        assert h.fake.calls_to("chat.appendStream")[0].status == 503
        assert h.fake.calls_to("chat.stopStream")[0].status == 503
        if persistent:
            assert h.fake.calls_to("chat.update")[-1].status == 200
        else:
            assert not reply.streaming
            # The stop landed the text: the one update only adds the feedback buttons.
            [update] = h.fake.calls_to("chat.update")
            assert update.args["blocks"][-1]["type"] == "context_actions"


#: A mention token Slack would turn into a notification.
LIVE_MENTION = re.compile(r"<(?:!(?:here|channel|everyone|group)\b|!subteam\^|@)[^>]*>", re.I)


def strings_in(value: object) -> Iterator[str]:
    """Every string in a payload (its blocks included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


@pytest.mark.parametrize("streaming", ["update", "native"])
async def test_a_prompt_injected_answer_pings_nobody(sqlite_url: str, streaming: str) -> None:
    async with running_bot(sqlite_url, streaming=streaming, provider_delay=0.02) as h:
        # A token split across deltas (and so, maybe, across appends) is still one token.
        answer = [
            "Ignore that. ",
            "<!chan",
            "nel> and <!here",
            ">, <!everyone>, <!subteam^S0|@oncall> and <@U_BOB>: ",
            *(f"word{i} " for i in range(20)),
            "done.",
        ]
        h.provider.enqueue(answer)
        ts = h.new_ts()
        await h.sender.mention("summarise the doc", ts=ts)
        await h.settle()

        sent = [(c.method, text) for c in h.fake.calls for text in strings_in(c.args)]
        assert [m for m, text in sent if m.startswith("chat.") and "word19" in text]
        assert [(m, text) for m, text in sent if LIVE_MENTION.search(text)] == []
        [reply] = h.fake.bot_messages(CHANNEL, ts)
        assert all(not LIVE_MENTION.search(state) for state in reply.states)
        assert reply.visible().replace(WORD_JOINER, "") == (
            "Ignore that. @channel and @here, @everyone, @oncall and @U_BOB: "
            + "".join(f"word{i} " for i in range(20))
            + "done."
        )
        if streaming == "native":
            assert h.fake.counts["chat.startStream"] == 1


@pytest.mark.parametrize("mode", ["auto", "native"])
async def test_refused_native_streaming_falls_back_to_post_and_update(
    sqlite_url: str, mode: str
) -> None:
    async with running_bot(sqlite_url, streaming=mode) as h:
        h.fake.native_streaming_error = "not_allowed"
        h.provider.enqueue(["Fallback ", "answer."], ["Second."])
        # DM threads: where auto streams natively (the asker is the only reader).
        first, second = h.new_ts(), h.new_ts()
        for text, thread in (("one", first), ("two", second)):
            await h.sender.message(
                text, channel=DM, channel_type="im", ts=h.new_ts(), thread_ts=thread
            )
            await h.settle()

        assert final_text(h, first, DM) == "Fallback answer."
        assert final_text(h, second, DM) == "Second."
        assert h.fake.counts["chat.postMessage"] == 2
        # auto remembers the refusal for the workspace; native keeps asking.
        assert h.fake.counts["chat.startStream"] == (1 if mode == "auto" else 2)


async def test_update_mode_never_streams_natively(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, streaming="update") as h:
        h.provider.enqueue(["Edited."])
        ts = h.new_ts()
        await h.sender.mention("one", ts=ts)
        await h.settle()
        assert final_text(h, ts) == "Edited."
        assert h.fake.counts["chat.startStream"] == 0


async def test_a_stream_slack_ended_is_finished_with_an_update(sqlite_url: str) -> None:
    fake = FakeSlack(rate_scale=10, stream_lifetime=0.0)
    async with fake, running_bot(sqlite_url, streaming="native", fake=fake) as h:
        h.provider.enqueue(["Started, ", "then the stream ", "expired."])
        ts = h.new_ts()
        await h.sender.mention("long one", ts=ts)
        await h.settle()
        assert final_text(h, ts) == "Started, then the stream expired."
        assert h.fake.counts["chat.update"] >= 1


async def test_long_answer_continues_in_follow_up_messages_without_breaking_code(
    sqlite_url: str,
) -> None:
    paragraph = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20 + "\n\n"
    code = "```python\n" + "".join(f"print({i})  # line {i}\n" for i in range(900)) + "```\n\n"
    answer = paragraph * 8 + code + paragraph * 4
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue([answer[i : i + 500] for i in range(0, len(answer), 500)])
        ts = h.new_ts()
        await h.sender.mention("write a lot", ts=ts)
        await h.settle()

        messages = [m.visible() for m in h.fake.bot_messages(CHANNEL, ts)]
        assert len(messages) >= 3
        assert all(len(m) <= 12_000 for m in messages)
        # Every message renders on its own: its code fences are balanced.
        assert all(m.count("```") % 2 == 0 for m in messages)

        def lines(text: str) -> list[str]:
            return [x for x in text.splitlines() if x.strip() and not x.startswith("```")]

        assert lines("\n".join(messages)) == lines(answer)
        assert h.fake.ratelimited.total() == 0


# -- 6. exactly once; ack first --------------------------------------------------------------


async def test_mention_delivered_as_app_mention_and_message_is_answered_once(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["Once."], ["Should not be used."])
        ts = h.new_ts()
        await h.sender.mention("hello", ts=ts, both=True)
        # Slack retries the app_mention, believing it timed out.
        await h.sender.mention("hello", ts=ts, both=False, retry_num=1)
        await h.settle()
        assert len(h.provider.requests) == 1
        assert [m.visible() for m in h.fake.bot_messages(CHANNEL, ts)] == ["Once."]


async def test_retry_reaching_another_process_is_dropped_by_the_engine(sqlite_url: str) -> None:
    async with FakeSlack(rate_scale=10) as fake:
        ts = fake.next_ts()
        async with running_bot(sqlite_url, fake=fake) as first:
            first.provider.enqueue(["Once."])
            await first.sender.mention("hello", ts=ts, both=False)
            await first.settle()
        # A restarted (or second) worker gets Slack's retry: its memory is empty, the store not.
        async with running_bot(sqlite_url, fake=fake) as second:
            second.provider.enqueue(["Twice?"])
            await second.sender.mention("hello", ts=ts, retry_num=2, retry_reason="http_error")
            await second.settle()
            assert second.provider.requests == []
        assert [m.visible() for m in fake.bot_messages(CHANNEL, ts)] == ["Once."]


async def test_events_are_acked_before_the_turn_runs(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.2) as h:
        h.provider.enqueue(["slow ", "answer ", "in ", "pieces."])
        ts = h.new_ts()
        [answer] = await h.sender.mention("take your time", ts=ts, both=False)
        # The 200 came back while the turn (at least 0.8 s of streaming) is still running.
        assert answer.status == 200
        assert h.bot.door.in_flight
        await h.settle()
        assert final_text(h, ts) == "slow answer in pieces."


# -- 7. silence where expected ---------------------------------------------------------------


async def test_edits_deletions_joins_bots_and_foreign_threads_get_no_answer(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["Answered."])
        known = h.new_ts()
        await h.sender.mention("start a thread", ts=known)
        await h.settle()
        before = h.fake.counts.copy()

        ts = h.new_ts
        noise = [
            # Our own chat.update comes back as message_changed.
            {
                "subtype": "message_changed",
                "message": {"text": "x", "ts": known},
                "thread_ts": known,
            },
            {"subtype": "message_deleted", "deleted_ts": known, "thread_ts": known},
            {"subtype": "channel_join", "text": "<@U_DAN> has joined the channel"},
            {"subtype": "bot_message", "bot_id": "B999", "thread_ts": known},
            {"bot_id": "BBOT", "user": "UBOT", "thread_ts": known},
            {"bot_id": "B777", "user": "U_OTHERBOT", "thread_ts": known},
        ]
        for extra in noise:
            await h.sender.message(f"noise <@{'UBOT'}>", ts=ts(), extra=extra)
        # Plain channel chatter and a thread the bot was never mentioned in.
        await h.sender.message("just chatting", ts=ts())
        stranger = h.fake.add_message(CHANNEL, "someone else's thread")
        await h.sender.message("a reply there", ts=ts(), thread_ts=stranger.ts)
        # Events we do not handle at all.
        await h.sender.event({"type": "reaction_added", "user": "U_ALICE", "reaction": "eyes"})
        await h.settle()

        assert len(h.provider.requests) == 1
        assert h.fake.counts == before


# -- 8. bad input ----------------------------------------------------------------------------


async def test_forged_or_stale_signatures_get_401_and_nothing_happens(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        forged = await h.sender.mention("hi", ts=h.new_ts(), secret="not-the-secret")
        stale = await h.sender.mention("hi", ts=h.new_ts(), timestamp=int(time.time()) - 600)
        command = await h.sender.command("/chatbot", "reset", signature="v0=deadbeef")
        await h.settle()
        assert [a.status for a in forged + stale] == [401] * 4
        assert command.status == 401
        assert h.provider.requests == []
        assert h.fake.counts["chat.postMessage"] == 0


async def test_empty_mention_gets_a_usage_hint(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        ts = h.new_ts()
        await h.sender.mention("", ts=ts)
        await h.settle()
        assert final_text(h, ts) == EMPTY_MESSAGE_HINT
        assert h.provider.requests == []


async def test_huge_message_is_refused_clearly_and_the_bot_keeps_serving(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        huge_ts, next_ts = h.new_ts(), h.new_ts()
        answers = await h.sender.mention("x" * 100_000, ts=huge_ts)
        assert [a.status for a in answers] == [200, 200]
        await h.settle()
        refusal = final_text(h, huge_ts)
        assert "100,00" in refusal and "at most" in refusal
        assert h.provider.requests == []

        h.provider.enqueue(["Still here."])
        await h.sender.mention("are you alive?", ts=next_ts)
        await h.settle()
        assert final_text(h, next_ts) == "Still here."


async def test_provider_outage_ends_in_plain_words_in_the_thread(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, max_attempts=3) as h:
        outage = [TransientProviderError("overloaded", status=529)]
        h.provider.enqueue(outage, outage, outage)
        ts = h.new_ts()
        await h.sender.mention("hello?", ts=ts)
        await h.settle()
        text = final_text(h, ts)
        assert "not answering right now" in text and "3 times" in text
        assert THINKING_TEXT not in text


# -- the process: health, shutdown -----------------------------------------------------------


async def test_healthz_answers_200_once_ready(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, start=False) as h:
        status, body = await h.get("/healthz")
        assert (status, body["ok"]) == (503, False)
        await h.bot.start()
        status, body = await h.get("/healthz")
        assert (status, body["ok"]) == (200, True)


async def test_shutdown_ends_replies_in_progress_with_a_note(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.05) as h:
        h.provider.enqueue(["Partial "] + ["words "] * 200)
        ts = h.new_ts()
        await h.sender.mention("tell me everything", ts=ts)
        await wait_for(lambda: "Partial" in final_text(h, ts))
        await h.bot.close()
        text = final_text(h, ts)
        assert text.startswith("Partial ")
        assert text.endswith(SHUTDOWN_NOTE)
        assert not h.bot.door.in_flight


# -- 9. set-up: the manifests --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["slack-manifest.yml", "slack-manifest.socket.yml"])
def test_manifest_matches_what_the_bot_serves(name: str) -> None:
    text = (Path(__file__).resolve().parents[2] / name).read_text()
    scopes = ("app_mentions:read", "chat:write", "commands", "channels:history", "im:history")
    # Issue 14: suggested prompts, files attached to questions.
    for scope in (*scopes, "assistant:write", "files:read"):
        assert f"- {scope}\n" in text
    events = ("app_mention", "message.channels", "message.groups", "message.im")
    # Issue 14: prompts when the DM opens, and the agent session's stop button.
    for event in (*events, "app_home_opened", "agent_session_stopped"):
        assert f"- {event}\n" in text
    # An agent app: its status, agent sessions and their stop button.
    assert "\n  agent_view:\n    agent_description: " in text
    assert "command: /chatbot\n" in text
    socket = name.endswith(".socket.yml")
    assert f"socket_mode_enabled: {'true' if socket else 'false'}\n" in text
    assert ("/slack/events" in text) is not socket


@pytest.mark.parametrize(
    ("env", "setting"),
    [({}, "SLACK_BOT_TOKEN"), ({"SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_SIGNING_SECRET")],
)
def test_missing_settings_exit_2_naming_them_before_touching_the_database(
    tmp_path: Path, env: dict[str, str], setting: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "DATABASE_"))}
    database = tmp_path / "bot.db"
    result = subprocess.run(
        [sys.executable, "-m", "bots.slack"],
        env={**clean, **env, "DATABASE_URL": f"sqlite+aiosqlite:///{database}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0]
    assert not database.exists()
