"""Thumbs up and down under every Discord answer, working across restarts.

Each button's ``custom_id`` names its answer (``threadbot:fb:good:123``, see
``core.feedback.feedback_id``); ``FeedbackButton`` is a discord.py ``DynamicItem`` registered
with ``Client.add_dynamic_items``, so a click on a button posted by an earlier process (or
another shard's) is handled from its ``custom_id`` alone. A click is answered within Discord's
3 s: a thumbs-up defers ephemerally and then says thanks, a thumbs-down opens the optional
reason modal at once; the click is stored after that (``core.feedback.Feedback.record`` checks
that it came from the answer's own message). A reason modal lives in the process that opened it:
a restart between opening and sending it loses the reason, never the thumbs-down.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import discord

from core.bot import FrontDoor
from core.feedback import BAD, GOOD, Click, feedback_id, parse_feedback_id

log = logging.getLogger(__name__)

PLATFORM = "discord"
CUSTOM_ID_PREFIX = "threadbot:fb:"
#: What an answer to a click says (ephemeral: only the clicker sees it).
THANKS = "Thanks for the feedback."
FEEDBACK_REFUSED = "That answer can't be rated from here."
FEEDBACK_FAILED = "Sorry, your feedback couldn't be saved. Please try again in a moment."
#: Seconds the reason modal waits for its answer before discord.py forgets it.
REASON_MODAL_SECONDS = 15 * 60.0
#: Discord's text input takes at most 4,000 characters; a reason needs far fewer.
REASON_MAX_CHARS = 1000
EMOJI = {GOOD: "👍", BAD: "👎"}


class FeedbackButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=re.escape(CUSTOM_ID_PREFIX) + r"(?P<rating>(?:good|bad):\d{1,19})",
):
    """One of the two buttons under an answer; the ``custom_id`` says which and for what."""

    def __init__(self, value: int, reply_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                emoji=EMOJI[value],
                custom_id=CUSTOM_ID_PREFIX + feedback_id(value, reply_id),
            )
        )
        self.value = value
        self.reply_id = reply_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> FeedbackButton:
        parsed = parse_feedback_id(match["rating"])
        assert parsed is not None  # the template admits only what parses
        return cls(*parsed)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        door = _door(interaction)
        if door is None or interaction.message is None:
            return
        click = Click(
            PLATFORM,
            str(interaction.message.id),
            str(interaction.user.id),
            self.reply_id,
            self.value,
        )
        if self.value == BAD:
            # The modal is the answer within 3 s; the thumbs-down counts whether or not it is sent.
            await interaction.response.send_modal(ReasonModal(click))
            await _record(door, click)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        answer = await _record(door, click)
        await interaction.followup.send(answer, ephemeral=True)


def feedback_view(reply_id: int) -> discord.ui.View:
    """The two buttons for answer ``reply_id``, as the last message of its reply carries them."""
    view = discord.ui.View(timeout=None)
    view.add_item(FeedbackButton(GOOD, reply_id))
    view.add_item(FeedbackButton(BAD, reply_id))
    return view


class ReasonModal(discord.ui.Modal):
    """The optional "what was wrong?" after a thumbs-down; stored as the user's latest click."""

    def __init__(self, click: Click) -> None:
        super().__init__(
            title="Thanks for the feedback",
            timeout=REASON_MODAL_SECONDS,
            custom_id=f"threadbot:fbr:{click.reply_id}",
        )
        self.click = click
        self.reason: discord.ui.TextInput[ReasonModal] = discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=REASON_MAX_CHARS,
            custom_id="reason",
        )
        self.add_item(
            discord.ui.Label(text="What was wrong with the answer?", component=self.reason)
        )

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        door = _door(interaction)
        reason = self.reason.value.strip()
        answer = THANKS
        if door is not None and reason:
            answer = await _record(door, _with_reason(self.click, reason))
        await interaction.response.send_message(answer, ephemeral=True)


def _with_reason(click: Click, reason: str) -> Click:
    return Click(click.platform, click.message, click.user_id, click.reply_id, click.value, reason)


def _door(interaction: discord.Interaction[Any]) -> FrontDoor | None:
    """The front door of the bot that received ``interaction`` (``DiscordBot.door``)."""
    door = getattr(interaction.client, "door", None)
    return door if isinstance(door, FrontDoor) else None


async def _record(door: FrontDoor, click: Click) -> str:
    """Store ``click``; what to tell the clicker."""
    try:
        counted = await door.feedback.record(click) is not None
    except Exception:
        log.exception("Discord feedback on answer %s not stored", click.reply_id)
        return FEEDBACK_FAILED
    return THANKS if counted else FEEDBACK_REFUSED
