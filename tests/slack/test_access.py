"""Who may use the bot on Slack, end to end: signed events and slash commands to the real Bolt
app, the real AsyncWebClient against the fake Slack (its ``users.info`` says who is an admin)."""

from __future__ import annotations

from bots.slack.app import CHANNEL_RIGHTS_NEEDED
from core.access import CHANNEL_REFUSAL, DM_REFUSAL, USER_REFUSAL
from tests.wire.slack.harness import Harness, running_bot

CHANNEL, OTHER_CHANNEL, DM = "C0001", "C0002", "D0001"
ALICE, MALLORY = "U_ALICE", "U_MALLORY"


async def channel_prompt(h: Harness, channel: str = CHANNEL) -> str | None:
    settings = await h.engine.store.channel_settings("slack", h.fake.team.team_id, channel)
    return settings.system_prompt


async def test_a_blocked_user_gets_silence_and_an_allowed_one_an_answer(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, blocked_users=(MALLORY,)) as h:
        h.provider.enqueue(["Hello Alice."])
        ignored = h.new_ts()
        await h.sender.mention("hello", ts=ignored, user=MALLORY)
        await h.sender.message("hi", channel=DM, channel_type="im", ts=h.new_ts(), user=MALLORY)
        answered = h.new_ts()
        await h.sender.mention("hello", ts=answered, user=ALICE)
        await h.settle()
        assert h.fake.bot_messages(DM) == [] and h.fake.bot_messages(CHANNEL, ignored) == []
        assert h.fake.thread_text(CHANNEL, answered) == "Hello Alice."
        assert len(h.provider.requests) == 1


async def test_only_allowed_users_are_answered(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, allowed_users=(ALICE,)) as h:
        h.provider.enqueue(["Hi."])
        stranger, friend = h.new_ts(), h.new_ts()
        await h.sender.mention("hello", ts=stranger, user=MALLORY)
        await h.sender.mention("hello", ts=friend, user=ALICE)
        await h.settle()
        assert h.fake.bot_messages(CHANNEL, stranger) == []
        assert h.fake.thread_text(CHANNEL, friend) == "Hi."


async def test_a_channel_outside_allowed_channels_gets_silence(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, allowed_channels=(CHANNEL,)) as h:
        h.provider.enqueue(["Here."], ["Still here."])
        await h.sender.mention("hello", channel=OTHER_CHANNEL, ts=h.new_ts())
        top = h.new_ts()
        await h.sender.mention("hello", ts=top)
        await h.settle()
        # A thread's channel is its parent: a follow-up in the allowed channel's thread goes on.
        await h.sender.message("and then?", ts=h.new_ts(), thread_ts=top)
        await h.settle()
        assert h.fake.bot_messages(OTHER_CHANNEL) == []
        assert h.fake.thread_text(CHANNEL, top) == "Here.Still here."


async def test_dms_off_get_one_polite_refusal_a_day(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, allow_dms=False) as h:
        for text in ("hello", "anyone there?"):
            await h.sender.message(text, channel=DM, channel_type="im", ts=h.new_ts())
            await h.settle()
        [refusal] = h.fake.bot_messages(DM)
        assert refusal.visible() == DM_REFUSAL
        assert h.provider.requests == []
        # The refusal is remembered in the database, so every worker agrees.
        await h.sender.message("third", channel=DM, channel_type="im", ts=h.new_ts(), user=MALLORY)
        await h.settle()
        assert len(h.fake.bot_messages(DM)) == 2
        answer = await h.sender.command(
            "/chatbot", "reset", channel=DM, channel_name="directmessage"
        )
        assert answer.json["text"] == DM_REFUSAL


async def test_commands_outside_the_rules_get_a_short_refusal(sqlite_url: str) -> None:
    async with running_bot(sqlite_url, allowed_channels=(CHANNEL,), blocked_users=(MALLORY,)) as h:
        blocked = await h.sender.command("/chatbot", "help", user=MALLORY)
        assert blocked.json == {"response_type": "ephemeral", "text": USER_REFUSAL}
        elsewhere = await h.sender.command("/chatbot", "help", channel=OTHER_CHANNEL)
        assert elsewhere.json["text"] == CHANNEL_REFUSAL
        here = await h.sender.command("/chatbot", "help")
        assert "/chatbot reset" in here.json["text"]


async def test_changing_a_channel_default_takes_a_workspace_admin(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.fake.users["U_ADMIN"] = {"id": "U_ADMIN", "is_admin": True}
        h.fake.users["U_OWNER"] = {"id": "U_OWNER", "is_primary_owner": True}
        h.fake.users[ALICE] = {"id": ALICE, "is_admin": False}

        refused = await h.sender.command("/chatbot", "system Be terse.", user=ALICE)
        assert refused.json["text"] == CHANNEL_RIGHTS_NEEDED
        cleared = await h.sender.command("/chatbot", "system clear", user=ALICE)
        assert cleared.json["text"] == CHANNEL_RIGHTS_NEEDED
        assert await channel_prompt(h) is None
        # Showing needs no rights.
        shown = await h.sender.command("/chatbot", "system", user=ALICE)
        assert "no default system prompt" in shown.json["text"]

        done = await h.sender.command("/chatbot", "system Be terse.", user="U_ADMIN")
        assert "Be terse." in done.json["text"] and await channel_prompt(h) == "Be terse."
        again = await h.sender.command("/chatbot", "system Be kind.", user="U_OWNER")
        assert "Be kind." in again.json["text"] and await channel_prompt(h) == "Be kind."

        # Each person's standing is asked once and remembered for a few minutes.
        await h.sender.command("/chatbot", "system Be brief.", user="U_ADMIN")
        asked = [call.args["user"] for call in h.fake.calls_to("users.info")]
        assert sorted(asked) == sorted([ALICE, "U_ADMIN", "U_OWNER"])


async def test_admin_users_may_change_a_channel_default_without_asking_slack(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url, admin_users=(ALICE,)) as h:
        done = await h.sender.command("/chatbot", "history count 3", user=ALICE)
        assert "newest 3 messages" in done.json["text"]
        assert h.fake.calls_to("users.info") == []
        refused = await h.sender.command("/chatbot", "history clear", user=MALLORY)
        assert refused.json["text"] == CHANNEL_RIGHTS_NEEDED


async def test_a_typed_history_command_in_a_thread_takes_the_same_rights(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        h.provider.enqueue(["First."])
        top = h.new_ts()
        await h.sender.mention("hello", ts=top)
        await h.settle()
        await h.sender.mention("history count 3", ts=h.new_ts(), thread_ts=top)
        await h.settle()
        assert h.fake.bot_messages(CHANNEL, top)[-1].visible() == CHANNEL_RIGHTS_NEEDED
        settings = await h.engine.store.channel_settings("slack", h.fake.team.team_id, CHANNEL)
        assert settings.max_history_messages is None

        h.fake.users["U_OWNER"] = {"id": "U_OWNER", "is_owner": True}
        await h.sender.mention("history count 3", ts=h.new_ts(), thread_ts=top, user="U_OWNER")
        await h.settle()
        assert "newest 3 messages" in h.fake.bot_messages(CHANNEL, top)[-1].visible()


async def test_history_in_a_dm_is_the_persons_own_and_needs_no_rights(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        answer = await h.sender.command(
            "/chatbot", "history count 4", channel=DM, channel_name="directmessage"
        )
        assert "newest 4 messages" in answer.json["text"]
        assert h.fake.calls_to("users.info") == []
