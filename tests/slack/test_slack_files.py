"""Files attached to Slack messages: downloaded from ``url_private_download`` with the bot token
(``files:read``), as Slack serves them; what Slack refuses is an error the core turns into a
note. The real Bolt app and AsyncWebClient's connection pool against the fake Slack."""

from __future__ import annotations

import pytest

from core.errors import PermanentSurfaceError
from tests.wire.slack import FakeSlack, Team
from tests.wire.slack.harness import running_bot

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
