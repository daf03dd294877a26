"""Slack's own surface while an answer is on its way (issue 14): the thread's status with its
loading messages, suggested prompts in a new assistant thread, and the agent session that gives
the stop button. The real Bolt app over HTTP, the real AsyncWebClient against the fake Slack."""

from __future__ import annotations

import time

import pytest

from core.config import DEFAULT_SLACK_LOADING_MESSAGES, Settings
from core.errors import ConfigError
from core.streaming import THINKING_TEXT
from tests.wire.slack.harness import demo, running_bot

CHANNEL = "C0001"
DM = "D0001"
PROMPTS = "Summarize=Summarize this thread for me|Explain=Explain it like I'm new here"


async def test_status_comes_after_the_mention_and_before_the_first_text(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.01) as h:
        ts = h.new_ts()
        sent_at = time.monotonic()
        await h.sender.mention("what is up?", ts=ts)
        await h.settle()

        [reply] = h.fake.bot_messages(CHANNEL, ts)
        assert reply.visible() == demo("what is up?")
        [status] = h.fake.statuses
        # In the thread the answer opens under the mention, "is thinking…" with the deployment's
        # loading messages (a default list of at most 10).
        assert (status.channel, status.thread_ts) == (CHANNEL, ts)
        assert status.status == "is thinking\u2026"
        assert status.loading_messages == DEFAULT_SLACK_LOADING_MESSAGES
        assert 0 < len(status.loading_messages) <= 10
        # After the mention, before the first text; no "Thinking…" message in between.
        assert sent_at <= status.at <= reply.times[0]
        assert THINKING_TEXT not in reply.states
        # Slack cleared the status when the answer was posted in the thread.
        assert (CHANNEL, ts) not in h.fake.showing
        first = [c.method for c in h.fake.calls_in_order()]
        assert first.index("assistant.threads.setStatus") < first.index("chat.postMessage")


async def test_status_in_an_assistant_thread_and_none_at_the_top_of_a_dm(sqlite_url: str) -> None:
    async with running_bot(
        sqlite_url, slack_loading_messages=("Looking\u2026", "Still looking\u2026")
    ) as h:
        thread = h.new_ts()
        await h.sender.message(
            "in a thread", channel=DM, channel_type="im", ts=h.new_ts(), thread_ts=thread
        )
        await h.settle()
        [status] = h.fake.statuses
        assert (status.channel, status.thread_ts) == (DM, thread)
        assert status.loading_messages == ("Looking\u2026", "Still looking\u2026")

        # A message at the top of the DM has no thread to show a status in (the answer is
        # posted at the top, as before).
        await h.sender.message("at the top", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        assert len(h.fake.statuses) == 1
        top = [m for m in h.fake.bot_messages(DM) if m.thread_ts is None]
        assert [m.visible() for m in top] == [demo("in a thread", "at the top")]


@pytest.mark.parametrize(
    ("error", "status"), [("missing_scope", 200), ("ratelimited", 429), ("internal_error", 500)]
)
async def test_a_refused_status_does_not_delay_or_break_the_answer(
    sqlite_url: str, error: str, status: int
) -> None:
    async with running_bot(sqlite_url) as h:
        if error == "missing_scope":
            h.fake.missing_scopes.add("assistant.threads.setStatus")
        else:
            h.fake.fail_next("assistant.threads.setStatus", error, status=status)
        ts = h.new_ts()
        await h.sender.mention("hello?", ts=ts)
        await h.settle()

        [reply] = h.fake.bot_messages(CHANNEL, ts)
        # No status: the answer went on at once, with its "Thinking…" message, to the end.
        assert reply.states[0] == THINKING_TEXT
        assert reply.visible() == demo("hello?")
        assert h.fake.statuses == []
        [attempt] = h.fake.calls_to("assistant.threads.setStatus")
        assert attempt.error == error

        if error == "ratelimited":
            return  # The workspace's status budget is paused for Retry-After: no status a while.
        again = h.new_ts()
        await h.sender.mention("and again?", ts=again)
        await h.settle()
        assert h.fake.thread_text(CHANNEL, again) == demo("and again?")
        tried = len(h.fake.calls_to("assistant.threads.setStatus"))
        if error == "missing_scope":
            # Refused for good in this workspace: not asked again.
            assert tried == 1
        else:
            # A passing failure (a 5xx): the next answer shows its status again.
            assert tried == 2 and len(h.fake.statuses) == 1


async def test_suggested_prompts_in_a_new_assistant_thread_and_an_opened_agent_dm(
    sqlite_url: str,
) -> None:
    prompts = Settings.from_mapping({"SLACK_SUGGESTED_PROMPTS": PROMPTS}).slack_suggested_prompts
    async with running_bot(sqlite_url, slack_suggested_prompts=prompts) as h:
        thread = h.new_ts()
        answer = await h.sender.assistant_thread_started(
            channel=DM, thread_ts=thread, event_id="EvA1"
        )
        assert answer.status == 200
        # Slack's redelivery of the same event changes nothing.
        again = await h.sender.assistant_thread_started(
            channel=DM, thread_ts=thread, event_id="EvA1", retry_num=1
        )
        assert again.status == 200
        await h.settle()
        [(channel, thread_ts, args)] = h.fake.suggested
        assert (channel, thread_ts) == (DM, thread)
        assert args["prompts"] == [
            {"title": "Summarize", "message": "Summarize this thread for me"},
            {"title": "Explain", "message": "Explain it like I'm new here"},
        ]

        # The Agent messaging experience: the DM's Messages tab opened; no thread_ts (an agent
        # app's call with one is dropped by Slack). The Home tab gets nothing.
        await h.sender.app_home_opened(channel="D0002", tab="messages")
        await h.sender.app_home_opened(channel="D0003", tab="home")
        await h.settle()
        assert [(c, t) for c, t, _ in h.fake.suggested] == [(DM, thread), ("D0002", None)]
        # Nothing was answered: these events are not questions.
        assert h.provider.requests == []


async def test_no_suggested_prompts_when_none_are_set(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        answer = await h.sender.assistant_thread_started(channel=DM, thread_ts=h.new_ts())
        assert answer.status == 200
        await h.settle()
        assert h.fake.calls_to("assistant.threads.setSuggestedPrompts") == []


async def test_agent_session_is_processing_while_answering_then_active(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, provider_delay=0.01) as h:
        ts = h.new_ts()
        await h.sender.mention("a question", ts=ts)
        await h.settle()

        assert h.fake.sessions[(CHANNEL, ts)] == ["processing", "active"]
        [opened, closed] = h.fake.calls_to("agents.sessions.setStatus")
        assert opened.args["initiator_user_id"] == "U_ALICE"
        [reply] = h.fake.bot_messages(CHANNEL, ts)
        # Processing before the first text; active once the final text is shown.
        assert opened.at <= reply.times[0]
        assert closed.at >= reply.times[reply.states.index(reply.visible())]


async def test_an_app_that_is_no_agent_answers_as_before(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.fake.missing_scopes.add("agents.sessions.setStatus")
        for question in ("one", "two"):
            ts = h.new_ts()
            await h.sender.mention(question, ts=ts)
            await h.settle()
            assert h.fake.thread_text(CHANNEL, ts) == demo(question)
        # Refused for good once: not asked again, and never an "active" without "processing".
        assert len(h.fake.calls_to("agents.sessions.setStatus")) == 1
        assert h.fake.sessions == {}


def test_loading_messages_and_suggested_prompts_settings() -> None:
    settings = Settings.from_mapping({})
    assert settings.slack_loading_messages == DEFAULT_SLACK_LOADING_MESSAGES
    assert settings.slack_suggested_prompts == ()
    custom = Settings.from_mapping(
        {
            "SLACK_LOADING_MESSAGES": " Reading… | Thinking… ",
            "SLACK_SUGGESTED_PROMPTS": "What can you do? | Draft=Draft a reply for me",
        }
    )
    assert custom.slack_loading_messages == ("Reading…", "Thinking…")
    assert custom.slack_suggested_prompts == (
        ("What can you do?", "What can you do?"),
        ("Draft", "Draft a reply for me"),
    )
    assert Settings.from_mapping({"SLACK_LOADING_MESSAGES": "none"}).slack_loading_messages == ()
    with pytest.raises(ConfigError, match="at most 10") as too_many:
        Settings.from_mapping({"SLACK_LOADING_MESSAGES": "|".join(["x"] * 11)})
    assert too_many.value.setting == "SLACK_LOADING_MESSAGES"
    with pytest.raises(ConfigError, match="at most 4"):
        Settings.from_mapping({"SLACK_SUGGESTED_PROMPTS": "a|b|c|d|e"})
    with pytest.raises(ConfigError, match="title=message"):
        Settings.from_mapping({"SLACK_SUGGESTED_PROMPTS": "=no title"})
