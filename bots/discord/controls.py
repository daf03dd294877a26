"""Stop and Regenerate: the buttons that act on a Discord answer, working across restarts.

"Stop" sits on an answer's messages while they stream (``DiscordReply.controls``); "Regenerate"
sits on the final message of an answer, next to the feedback buttons (``DiscordReply.
offer_feedback``). Each button's ``custom_id`` names the conversation it acts on
(``threadbot:stop:<workspace>:<channel>:<thread>``, ``threadbot:regen:…``), and both are
discord.py ``DynamicItem``s registered with ``Client.add_dynamic_items``: a click on a button an
earlier process (or another shard) posted is handled from the ``custom_id`` alone. A
``custom_id`` cannot be forged (Discord delivers clicks only on components the bot's own message
carries), and the front door checks the rest (the newest answer, nothing streaming).

The bot (``AnswerControls``, ``bots.discord.client.DiscordBot``) answers the click: it defers at
once, within Discord's 3 s, then calls the front door.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

import discord

from core.conversation import ConversationKey

PLATFORM = "discord"
STOP_PREFIX = "threadbot:stop:"
REGENERATE_PREFIX = "threadbot:regen:"
#: A conversation key after the prefix: workspace (a guild id, or ``@me`` for DMs), channel and
#: thread (empty for a DM). At most 16 + 62 characters: within Discord's 100 for a custom_id.
_KEY = r"(?P<workspace>@me|\d{1,20}):(?P<channel>\d{1,20}):(?P<thread>\d{0,20})"
#: The action of a Stop or Regenerate button's ``custom_id`` (``STOP_PREFIX``, ``REGENERATE_PREFIX``).
_ACTION = r"threadbot:(?P<action>stop|regen):"
_ANY_CONTROL = re.compile(_ACTION + _KEY)


def key_id(key: ConversationKey) -> str:
    """What a button carries of ``key``: ``workspace:channel:thread``."""
    return f"{key.workspace}:{key.channel}:{key.thread}"


def _key(match: re.Match[str]) -> ConversationKey:
    return ConversationKey(PLATFORM, match["workspace"], match["channel"], match["thread"])


def key_on(message: discord.Message) -> ConversationKey | None:
    """The conversation a Stop or Regenerate button on ``message`` names (None: no such button)."""
    for row in message.components:
        for item in getattr(row, "children", ()):
            match = _ANY_CONTROL.fullmatch(getattr(item, "custom_id", None) or "")
            if match is not None:
                return _key(match)
    return None


@runtime_checkable
class AnswerControls(Protocol):
    """What handles the clicks: the bot that received them (``DiscordBot``)."""

    async def stop_clicked(
        self, interaction: discord.Interaction[Any], key: ConversationKey
    ) -> None: ...

    async def regenerate_clicked(
        self, interaction: discord.Interaction[Any], key: ConversationKey, message_id: str
    ) -> None: ...


#: What each button does, as its ``custom_id`` spells it: (label, emoji).
_ACTIONS = {"stop": ("Stop", "\u23f9\ufe0f"), "regen": ("Regenerate", "\U0001f504")}


class AnswerButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=_ACTION + _KEY,
):
    """ "Stop" on a streaming answer, or "Regenerate" on the final message of an answer, in
    conversation ``key`` (``stop_button``, ``regenerate_button``)."""

    def __init__(self, action: str, key: ConversationKey) -> None:
        label, emoji = _ACTIONS[action]
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                label=label,
                emoji=emoji,
                custom_id=(STOP_PREFIX if action == "stop" else REGENERATE_PREFIX) + key_id(key),
            )
        )
        self.action = action
        self.key = key

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> AnswerButton:
        return cls(match["action"], _key(match))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        client = interaction.client
        if not isinstance(client, AnswerControls):
            return
        if self.action == "stop":
            await client.stop_clicked(interaction, self.key)
        elif interaction.message is not None:
            await client.regenerate_clicked(interaction, self.key, str(interaction.message.id))


def stop_button(key: ConversationKey) -> AnswerButton:
    """ "Stop" on a streaming answer of conversation ``key``."""
    return AnswerButton("stop", key)


def regenerate_button(key: ConversationKey) -> AnswerButton:
    """ "Regenerate" on the final message of an answer in conversation ``key``."""
    return AnswerButton("regen", key)


def stop_view(key: ConversationKey) -> discord.ui.View:
    """The view of a message that is still streaming: the Stop button alone."""
    view = discord.ui.View(timeout=None)
    view.add_item(stop_button(key))
    return view
