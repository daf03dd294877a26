"""SlackReply against the fake Slack Web API with the real AsyncWebClient: scopes, error
translation at the boundary, one request per call (slack_sdk retries nothing); and the
text conversions of bots/slack/formatting.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from bots.slack.app import build_client
from bots.slack.formatting import (
    WORD_JOINER,
    fallback_text,
    mentions,
    neutralise_mentions,
    strip_mention,
    to_plain,
)
from bots.slack.surface import NATIVE_STREAMS, ReplyTarget, SlackReply
from core.config import Settings
from core.errors import PermanentSurfaceError, SurfaceRateLimited, TransientSurfaceError
from tests.wire.slack import FakeSlack, Limit

TARGET = ReplyTarget("T0001", "C0001", "1700000000.000001", "U_ALICE", "T0001")


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


async def surface_for(fake: FakeSlack, url: str | None = None) -> SlackReply:
    settings = Settings().with_overrides(
        slack_bot_token=fake.team.token, slack_api_url=url or fake.url
    )
    return SlackReply(build_client(settings), TARGET)


def test_scopes_are_slacks_limits_per_method_per_workspace() -> None:
    surface = SlackReply(build_client(Settings().with_overrides(slack_bot_token="x")), TARGET)
    [edit] = surface.scopes("edit")
    assert (edit.key, edit.per_second) == ("slack:T0001:chat.update", 50 / 60)
    channel, workspace = surface.scopes("post")
    assert (channel.key, channel.per_second) == ("slack:T0001:C0001:chat.postMessage", 1.0)
    assert workspace.key == "slack:T0001:chat.postMessage"
    assert surface.scopes("start")[0].per_second == surface.scopes("stop")[0].per_second == 20 / 60
    assert surface.scopes("append")[0].per_second == 100 / 60
    scaled = SlackReply(surface.client, TARGET, rate_scale=10)
    assert scaled.scopes("edit")[0].per_second == pytest.approx(500 / 60)


async def test_post_and_edit_send_markdown_blocks(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    message_id = await surface.post("**Hi** <there> & `code`")
    channel, ts = message_id.split(":")
    await surface.edit(message_id, "Bye")
    message = fake.message(channel, ts)
    assert message.thread_ts == TARGET.thread_ts
    assert message.states == ["**Hi** <there> & `code`", "Bye"]
    first = fake.calls_to("chat.postMessage")[0].args
    assert first["text"] == "Hi &lt;there&gt; &amp; `code`"
    assert first["unfurl_links"] is False


async def test_429_is_rate_limited_with_retry_after_and_not_retried_by_the_sdk() -> None:
    limits = {"chat.postMessage": Limit(per_minute=1, burst=1, per_channel=True)}
    async with FakeSlack(limits=limits) as fake:
        surface = await surface_for(fake)
        await surface.post("one")
        with pytest.raises(SurfaceRateLimited) as caught:
            await surface.post("two")
        assert caught.value.retry_after == 60
        assert caught.value.scope == "slack:T0001:C0001:chat.postMessage"
        assert fake.counts["chat.postMessage"] == 2
        assert fake.ratelimited["chat.postMessage"] == 1


async def test_server_errors_and_dropped_connections_are_transient(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    message_id = await surface.post("hello")
    fake.fail_next("chat.update", "internal_error", status=500)
    with pytest.raises(TransientSurfaceError):
        await surface.edit(message_id, "again")
    assert fake.counts["chat.update"] == 1
    fake.fail_next("chat.update", "service_unavailable", status=200)
    with pytest.raises(TransientSurfaceError):
        await surface.edit(message_id, "again")

    # Nothing listens on the port of a stopped server.
    stopped = FakeSlack()
    await stopped.start()
    url = stopped.url
    await stopped.stop()
    unreachable = await surface_for(fake, url)
    with pytest.raises(TransientSurfaceError):
        await unreachable.post("anyone?")


#: What a proxy or load balancer in front of Slack answers instead of Slack's JSON.
HTML_503 = "<html><head><title>503 Service Unavailable</title></head><body>busy</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected"),
    [
        (502, "Bad Gateway", "text/plain", TransientSurfaceError),
        (503, HTML_503, "text/html", TransientSurfaceError),
        (504, "", None, TransientSurfaceError),
        (500, "{truncated", "application/json", TransientSurfaceError),
        (408, "Request Timeout", "text/plain", TransientSurfaceError),
        (200, "upstream says hello", "text/plain", TransientSurfaceError),
        (200, HTML_503, "text/html", TransientSurfaceError),
        (429, "Too Many Requests", "text/plain", SurfaceRateLimited),
        (403, "<html>Forbidden</html>", "text/html", PermanentSurfaceError),
    ],
)
async def test_any_body_from_a_proxy_is_translated_by_its_status(
    status: int, body: str, content_type: str | None, expected: type[Exception]
) -> None:
    async with FakeSlack(limits={}) as fake:
        surface = await surface_for(fake)
        message_id = await surface.post("hello")
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("chat.postMessage", lambda: surface.post("again")),
            ("chat.update", lambda: surface.edit(message_id, "edited")),
            ("chat.appendStream", lambda: surface.append(message_id, "more")),
        ]
        for method, call in calls:
            headers = {"Retry-After": "7"} if status == 429 else None
            fake.answer_next(method, status, body, content_type=content_type, headers=headers)
            with pytest.raises(expected) as caught:
                await call()
            if isinstance(caught.value, SurfaceRateLimited):
                assert caught.value.retry_after == 7
            if isinstance(caught.value, PermanentSurfaceError):
                assert caught.value.code == f"http_{status}"


async def test_other_errors_are_permanent_with_slacks_code(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    fake.fail_next("chat.postMessage", "channel_not_found")
    with pytest.raises(PermanentSurfaceError) as caught:
        await surface.post("hello")
    assert caught.value.code == "channel_not_found"
    with pytest.raises(PermanentSurfaceError) as gone:
        await surface.edit("C0001:1700000099.000001", "edit a message that is not there")
    assert gone.value.code == "message_not_found"


async def test_native_stream_calls_and_refusal(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    message_id = await surface.start("")
    await surface.append(message_id, "Hello ")
    await surface.stop(message_id, "world")
    channel, ts = message_id.split(":")
    assert fake.message(channel, ts).states == ["", "Hello ", "Hello world"]
    with pytest.raises(PermanentSurfaceError) as ended:
        await surface.append(message_id, "late")
    assert ended.value.code == "message_not_in_streaming_state"

    fake.native_streaming_error = "not_allowed"
    with pytest.raises(PermanentSurfaceError) as caught:
        await surface.start("")
    assert caught.value.code == "not_allowed"
    assert caught.value.code in NATIVE_STREAMS.unsupported_codes


async def test_the_client_keeps_one_connection_pool_when_given_a_session(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    async with aiohttp.ClientSession() as session:
        surface.client.session = session
        await surface.post("pooled")
    assert fake.counts["chat.postMessage"] == 1


def test_incoming_mrkdwn_becomes_what_the_person_typed() -> None:
    raw = (
        "<@UBOT> is 1 &lt; 2 &amp;&amp; 3 &gt; 2? see <https://a.io/x?y=1|the docs>, "
        "<https://b.io>, <mailto:a@b.io|a@b.io>, <#C123|general>, <!here> and <@U_BOB|bob>"
    )
    assert to_plain(strip_mention(raw, "UBOT")) == (
        "is 1 < 2 && 3 > 2? see the docs (https://a.io/x?y=1), https://b.io, a@b.io, "
        "#general, @here and @bob"
    )
    assert mentions(raw, "UBOT") and not mentions(raw, "U_CAROL")
    assert strip_mention("<@UBOT|threadbot>  reset ", "UBOT") == "reset"


def test_fallback_text_is_short_plain_escaped_mrkdwn() -> None:
    text = "# Title\n\n**Bold** and [a link](https://x.io) <b>\n```py\nx = 1\n```" + " more" * 200
    fallback = fallback_text(text)
    assert fallback.startswith("Title Bold and a link (https://x.io) &lt;b&gt; py x = 1 more")
    assert len(fallback) <= 300 + len("&lt;&gt;") and fallback.endswith("…")


def test_mentions_from_the_model_are_silenced_and_read_as_words() -> None:
    raw = (
        "<!channel> <!here|here> <!everyone> <!group> <!subteam^S1|@oncall> <!subteam^S2> "
        "<@U123> <@W9|alice> <@U1|<!here>> <!HERE>"
    )
    quiet = neutralise_mentions(raw)
    assert "<" not in quiet and ">" not in quiet
    assert quiet.replace(WORD_JOINER, "") == (
        "@channel @here @everyone @group @oncall @S2 @U123 @alice @@here @HERE"
    )
    assert neutralise_mentions(quiet) == quiet
    # What does not notify stays as written: links, channels, dates, HTML in code.
    kept = "<https://x.io|x> <#C1|general> <!date^1^{date}|today> `<!DOCTYPE html>` a <b> c"
    assert neutralise_mentions(kept) == kept


def test_rendering_is_chunk_safe_wherever_no_token_is_cut() -> None:
    text = "Hi <!here>, see <@U1|bob> and <!subteam^S1> now."
    for cut in range(len(text) + 1):
        head, tail = text[:cut], text[cut:]
        inside = any(m.start() < cut < m.end() for m in re.finditer(r"<[^>]*>", text))
        if not inside:
            assert neutralise_mentions(head) + neutralise_mentions(tail) == (
                neutralise_mentions(text)
            )


async def test_every_method_silences_mentions_in_every_field(fake: FakeSlack) -> None:
    surface = await surface_for(fake)
    loud = "Hey <!channel>, <@U_BOB>!"
    posted = await surface.post(loud)
    await surface.edit(posted, loud)
    streamed = await surface.start(loud)
    await surface.append(streamed, loud)
    await surface.stop(streamed, loud)
    for call in fake.calls:
        for field in ("text", "markdown_text", "blocks"):
            assert "<!channel>" not in str(call.args.get(field, ""))
            assert "<@U_BOB>" not in str(call.args.get(field, ""))
    channel, ts = posted.split(":")
    assert fake.message(channel, ts).visible().replace(WORD_JOINER, "") == "Hey @channel, @U_BOB!"
