"""Files attached to Slack messages: downloaded from ``url_private_download`` with the bot token
(``files:read``), as Slack serves them; what Slack refuses is an error the core turns into a
note. The real Bolt app and AsyncWebClient's connection pool against the fake Slack."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.errors import PermanentSurfaceError
from core.models import ModelChoice
from tests.wire.llm_server import FakeLLMServer
from tests.wire.slack import FakeSlack, Team
from tests.wire.slack.harness import running_bot

CHANNEL = "C0001"
DM = "D0001"

OURS = Team("T0001", "xoxb-test-token", "UBOT", "BBOT")
OTHER = Team("T0002", "xoxb-other-token", "UBOT2", "BBOT2")


async def test_a_file_is_downloaded_with_the_bot_token(sqlite_url: str) -> None:
    async with running_bot(sqlite_url) as h:
        content = b"line one\nline two\n" * 100
        file = h.fake.add_file("notes.txt", content)
        data = await h.bot.download_file(file["url_private_download"])
        assert data == content
        assert h.fake.downloads[file["id"]] == 1
        assert h.fake.refused_downloads == 0


async def test_a_file_slack_will_not_serve_is_an_error_not_a_sign_in_page(
    sqlite_url: str,
) -> None:
    async with (
        FakeSlack(teams=(OURS, OTHER), rate_scale=10) as fake,
        running_bot(sqlite_url, fake=fake) as h,
    ):
        # A file of another workspace: Slack sends the bot to sign in (a redirect to an HTML
        # page), never the bytes.
        foreign = fake.add_file("secret.png", b"\x89PNG...", mimetype="image/png", team_id="T0002")
        with pytest.raises(PermanentSurfaceError) as refused:
            await h.bot.download_file(foreign["url_private_download"])
        assert refused.value.code == "file_access_denied"
        assert "files:read" in str(refused.value)
        assert fake.refused_downloads == 1


async def test_the_bot_token_goes_to_slack_only_and_downloads_are_bounded(
    sqlite_url: str,
) -> None:
    async with running_bot(sqlite_url) as h:
        # Not Slack's file host nor SLACK_API_URL's: nothing is requested, no token leaves.
        with pytest.raises(PermanentSurfaceError) as foreign:
            await h.bot.download_file("https://files.example.com/files-pri/T0001-F1/download/a")
        assert foreign.value.code == "not_slack_file"
        # Whatever Slack said the size was, no more than the bound is read.
        big = h.fake.add_file("big.log", b"x" * 200_000)
        with pytest.raises(PermanentSurfaceError) as too_large:
            await h.bot.download_file(big["url_private_download"], max_bytes=100_000)
        assert too_large.value.code == "file_too_large"
        assert h.fake.refused_downloads == 0


# -- through the whole bot: a question with files, a model that sees images ---------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
VISION = ModelChoice("openai", "gpt-4.1-mini", True)
BLIND = ModelChoice("openai", "gpt-3.5-turbo", False)


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer() as server:
        yield server


def openai_models(llm: FakeLLMServer) -> dict[str, Any]:
    """Settings overrides: the two OpenAI models of MODELS, answered by the fake model server
    through the real openai SDK (the deployment's default stays the offline provider)."""
    return {
        "models": (VISION, BLIND),
        "openai_api_key": "sk-test",
        "openai_base_url": llm.openai_base_url,
    }


async def test_an_image_reaches_the_model_as_an_image_part_and_a_text_file_is_inlined(
    sqlite_url: str, llm: FakeLLMServer
) -> None:
    async with running_bot(sqlite_url, **openai_models(llm)) as h:
        # The model command, typed as Slack's slash command in the channel (an admin's).
        h.fake.users["U_ALICE"] = {"id": "U_ALICE", "is_admin": True}
        chosen = await h.sender.command("/chatbot", "model gpt-4.1-mini")
        assert "gpt-4.1-mini" in chosen.json["text"]

        image = h.fake.add_file("chart.png", PNG, mimetype="image/png")
        notes = h.fake.add_file("notes.txt", b"sales went up in May")
        ts = h.new_ts()
        await h.sender.mention(
            "what does this show?",
            ts=ts,
            extra={"files": [image, notes], "upload": False},
        )
        await h.settle()

        [request] = llm.chat_requests()
        assert request.body["model"] == "gpt-4.1-mini"
        content = request.body["messages"][-1]["content"]
        data = base64.b64encode(PNG).decode("ascii")
        assert content[-1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{data}"},
        }
        [text] = [part["text"] for part in content if part["type"] == "text"]
        assert text.startswith("what does this show?")
        assert "--- notes.txt ---\nsales went up in May" in text
        # Each file downloaded once, with the bot token.
        assert h.fake.downloads == {image["id"]: 1, notes["id"]: 1}
        assert h.fake.thread_text(CHANNEL, ts).startswith("You said:")


async def test_an_image_for_a_model_that_cannot_see_gets_a_note_and_an_answer(
    sqlite_url: str, llm: FakeLLMServer
) -> None:
    async with running_bot(sqlite_url, **openai_models(llm)) as h:
        await h.sender.message("model gpt-3.5-turbo", channel=DM, channel_type="im", ts=h.new_ts())
        await h.settle()
        image = h.fake.add_file("cat.png", PNG, mimetype="image/png")
        await h.sender.message(
            "what is this?",
            channel=DM,
            channel_type="im",
            ts=h.new_ts(),
            extra={"files": [image], "subtype": "file_share"},
        )
        await h.settle()

        [request] = llm.chat_requests()
        assert request.body["model"] == "gpt-3.5-turbo"
        assert all(
            part.get("type") != "image_url"
            for message in request.body["messages"]
            if isinstance(message["content"], list)
            for part in message["content"]
        )
        answer = h.fake.bot_messages(DM)[-1].visible()
        assert answer.startswith("You said:")
        assert "cat.png was not sent: gpt-3.5-turbo cannot see images" in answer
        # Never downloaded: the model could not have used it.
        assert h.fake.downloads == {}


async def test_model_chosen_with_a_mention_in_a_thread(sqlite_url: str, llm: FakeLLMServer) -> None:
    async with running_bot(sqlite_url, **openai_models(llm)) as h:
        thread = h.new_ts()
        await h.sender.mention("hello", ts=thread)
        await h.settle()
        # In a thread (where Slack allows no slash commands): "@bot model <name>".
        await h.sender.mention("model gpt-4.1-mini", ts=h.new_ts(), thread_ts=thread)
        await h.settle()
        assert "gpt-4.1-mini" in h.fake.bot_messages(CHANNEL, thread)[-1].visible()
        await h.sender.mention("model gpt-9", ts=h.new_ts(), thread_ts=thread)
        await h.settle()
        refusal = h.fake.bot_messages(CHANNEL, thread)[-1].visible()
        assert "gpt-9" in refusal and "gpt-4.1-mini" in refusal and "gpt-3.5-turbo" in refusal

        await h.sender.message("and now?", ts=h.new_ts(), thread_ts=thread)
        await h.settle()
        # The offline default answered "hello"; the chosen model answers from then on.
        [request] = llm.chat_requests()
        assert request.body["model"] == "gpt-4.1-mini"
        assert request.body["messages"][-1]["content"] == "and now?"
