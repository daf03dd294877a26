"""The Discord bot: a discord.py ``Client`` translating messages and app commands for the front door.

Each person's message becomes a ``DiscordArrival`` and each app command a ``Command``, handed to
``core.bot.FrontDoor``, which routes them (the same rules as every platform), streams the answer
into a ``DiscordReply`` and keeps the turns in flight. What is Discord's stays here:

- what counts as a mention (the bot's user, or the bot's own role, which the composer offers
  next to it), a DM and a thread;
- a mention in a text channel opens a thread on the message (its id is the message's id) and the
  answer streams inside; where the bot may not open one it answers as a reply in the channel;
- other bots, webhooks, the bot itself and system messages are dropped before anything else;
- app commands, the Manage Channels permission that changing a channel's defaults needs (the
  front door decides when; the interaction or the member says whether), and the interaction's
  3 s window (deferred when a command is slow). A MESSAGE_CREATE replayed after a RESUME is dropped by the engine's dedupe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket

from bots.discord.attachments import attachment
from bots.discord.controls import AnswerButton, key_on
from bots.discord.feedback import FeedbackButton
from bots.discord.surface import DiscordReply, place_of
from core.bot import Budgets, Facts, FrontDoor, PlatformProfile, Route, ThreadLine
from core.commands import ChannelTarget, Command, HelpStyle, parse_command
from core.config import Settings
from core.conversation import ConversationKey
from core.engine import ChatEngine
from core.models import model_names

log = logging.getLogger(__name__)

PLATFORM = "discord"
#: ConversationKey.workspace of DMs (Discord's own name for them in URLs).
DM_WORKSPACE = "@me"
#: discord-api-docs "Start Thread from Message": ``name`` is 1-100 characters.
MAX_THREAD_NAME_CHARS = 100
#: Threads archive after a day without messages (one of Discord's allowed 60/1440/4320/10080).
THREAD_ARCHIVE_MINUTES: Literal[60, 1440, 4320, 10080] = 1440
#: discord-api-docs "JSON Error Codes": a thread has already been created for this message.
THREAD_ALREADY_CREATED = 160004
#: Earlier thread messages read to seed a conversation when first mentioned in a thread.
THREAD_CONTEXT_MESSAGES = 20
#: An interaction must be answered within 3 s ("Receiving and Responding"); commands still
#: running after this long are deferred (ephemeral "thinking") and answered by editing.
INTERACTION_DEFER_AFTER = 2.0
#: What the bot needs in a channel, for the invite URL: View Channels, Send Messages, Read
#: Message History, Create Public Threads, Send Messages in Threads.
BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    read_message_history=True,
    create_public_threads=True,
    send_messages_in_threads=True,
)
INVITE_SCOPES = ("bot", "applications.commands")
#: Message types people write; everything else (joins, pins, thread-created notices) is a
#: system message.
CONVERSATIONAL_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})
THREAD_TYPES = frozenset(
    {
        discord.ChannelType.public_thread,
        discord.ChannelType.private_thread,
        discord.ChannelType.news_thread,
    }
)

#: Discord shows a typing indicator for 10 s after each trigger (discord-api-docs "Trigger
#: Typing Indicator"); refresh it a little before it lapses while the model is silent.
TYPING_REFRESH_SECONDS = 8.0
#: Who may change a channel's defaults on Discord, said to someone who may not.
MANAGE_CHANNELS_NEEDED = (
    "Changing this channel's defaults needs the Manage Channels permission (or being in "
    "ADMIN_USERS). Inside a thread, `/system set` changes that thread's conversation only."
)
#: Discord as the front door sees it: app commands (``/system set``), typing, no native streams.
PROFILE = PlatformProfile(
    name=PLATFORM,
    help=HelpStyle(prefix="/", app_commands=True),
    command_deadline=INTERACTION_DEFER_AFTER,
    typing_refresh=TYPING_REFRESH_SECONDS,
    channel_rights=MANAGE_CHANNELS_NEEDED,
)
THREAD_PERMISSIONS = ("create_public_threads", "send_messages_in_threads")
#: What a click on Stop or Regenerate, or the Regenerate command, says to the clicker alone.
NOTHING_TO_STOP = "That answer has already finished."
NOT_AN_ANSWER = (
    "Only the bot's answers can be regenerated: use Regenerate on an answer's last message."
)
ACTION_FAILED = "Sorry, that didn't work. Please try again in a moment."
#: Discord shows at most 25 autocomplete choices (discord-api-docs "Autocomplete").
MAX_CHOICES = 25
#: What ``/model name:clear`` means: back to the default model.
CLEAR_MODEL = "clear"


def model_choices(names: Sequence[str], typed: str) -> list[str]:
    """The names offered while someone types ``typed`` in ``/model name``: those starting with
    it (any case), in the settings' order, then ``clear``; at most 25."""
    prefix = typed.strip().lower()
    offered = [name for name in names if name.lower().startswith(prefix)]
    if CLEAR_MODEL.startswith(prefix):
        offered = [*offered[: MAX_CHOICES - 1], CLEAR_MODEL]
    return offered[:MAX_CHOICES]


def model_command(name: str | None) -> Command:
    """``/model`` without a name shows, ``/model name:clear`` clears, any other name sets."""
    if name is None or not name.strip():
        return Command("model_show")
    if name.strip().lower() == CLEAR_MODEL:
        return Command("model_clear")
    return Command("model_set", name.strip())


def bot_intents() -> discord.Intents:
    """Guilds, guild messages, DMs and the privileged message content (unmentioned follow-ups)."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


def invite_url(application_id: int) -> str:
    """The OAuth2 URL that adds the bot to a server with exactly the permissions it needs."""
    return discord.utils.oauth_url(
        application_id, permissions=BOT_PERMISSIONS, scopes=INVITE_SCOPES
    )


def thread_name(question: str) -> str:
    """A thread title from the question: one line, at most 100 characters."""
    name = " ".join(question.split())
    if len(name) > MAX_THREAD_NAME_CHARS:
        name = name[: MAX_THREAD_NAME_CHARS - 1].rstrip() + "…"
    return name or "Question"


def _normalised(command: dict[str, Any]) -> dict[str, Any]:
    """The parts of a command payload Discord stores, comparable across local and fetched."""
    result: dict[str, Any] = {
        "name": command.get("name"),
        "description": command.get("description") or "",
        "type": int(command.get("type") or 1),
    }
    # Discord leaves out ``required: false``; discord.py may send it.
    result["required"] = bool(command.get("required", False))
    if command.get("choices"):
        result["choices"] = sorted((c["name"], str(c["value"])) for c in command["choices"])
    result["options"] = [_normalised(o) for o in command.get("options") or []]
    return result


def commands_differ(local: list[dict[str, Any]], remote: list[dict[str, Any]]) -> bool:
    """Whether the tree's commands differ from what Discord has registered."""

    def key(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted((_normalised(c) for c in items), key=lambda c: (c["name"], c["type"]))

    return key(local) != key(remote)


class DiscordBot(discord.Client):
    """discord.py client wired to the front door. ``budgets`` is shared by every reply."""

    def __init__(
        self,
        settings: Settings,
        engine: ChatEngine,
        *,
        budgets: Budgets | None = None,
        defer_after: float = INTERACTION_DEFER_AFTER,
        announce: Callable[[str], None] | None = None,
        **options: Any,
    ) -> None:
        from bots.discord.surface import rate_limit_trace

        self.settings = settings
        self.engine = engine
        self.door = FrontDoor(
            settings,
            engine,
            dataclasses.replace(PROFILE, command_deadline=defer_after),
            budgets=budgets,
            reopen=self.reopen,
        )
        self.announce = announce or (lambda line: log.info("%s", line))
        super().__init__(
            intents=bot_intents(),
            http_trace=rate_limit_trace(self.door.budgets),
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.tree = app_commands.CommandTree(self)
        # Buttons under answers, also those an earlier process posted.
        self.add_dynamic_items(FeedbackButton, AnswerButton)
        #: Whether the last start pushed commands to Discord (False: they were up to date).
        self.commands_synced: bool | None = None
        self._add_commands()

    # -- start and stop ------------------------------------------------------------------------

    async def setup_hook(self) -> None:
        """After login, before the gateway: point at the gateway, print the invite, sync commands."""
        await self._choose_gateway()
        assert self.application_id is not None
        self.announce(f"Invite the bot to a server: {invite_url(self.application_id)}")
        self.commands_synced = await self.sync_commands()

    async def on_ready(self) -> None:
        # Replies a process that died left unfinished are finished (now and from time to time).
        self.door.start_recovery()

    async def reopen(self, place: str) -> DiscordReply | None:
        """The surface of a reply a process that died left unfinished (``DiscordReply.place``)."""
        try:
            where = json.loads(place)
            channel_id = int(where["channel"])
            # Places stored before they named the conversation have no key (then no buttons).
            key = ConversationKey(PLATFORM, *map(str, where["key"])) if "key" in where else None
            channel = self.get_channel(channel_id) or await self.fetch_channel(channel_id)
        except (ValueError, TypeError, KeyError, discord.HTTPException) as error:
            log.warning("cannot reopen a reply at %r: %s", place, error)
            return None
        if not isinstance(channel, discord.abc.Messageable):
            return None
        return DiscordReply(channel, key=key)

    async def _choose_gateway(self) -> None:
        settings = self.settings
        if settings.discord_gateway_url:
            url = settings.discord_gateway_url
        elif settings.discord_api_url:
            # A custom REST base (proxy, test server) tells us its gateway, as Discord's does.
            _, url, _ = await self.http.get_bot_gateway()
        else:
            return
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)

    async def close(self) -> None:
        """End turns in progress (their replies say so), then disconnect."""
        if not self.door.accepting:
            return await super().close()
        await self.door.close()
        await super().close()

    async def drain(self) -> None:
        """Wait for every turn in progress (tests, graceful shutdown)."""
        await self.door.drain()

    # -- app commands --------------------------------------------------------------------------

    def _add_commands(self) -> None:
        tree = self.tree

        @tree.command(name="reset", description="Start this conversation over")
        async def reset(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("reset"))

        @tree.command(name="help", description="How to talk to the bot")
        async def help_(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("help"))

        system = app_commands.Group(
            name="system", description="The system prompt of this conversation or channel"
        )

        @system.command(name="show", description="Show the system prompt in use")
        async def show(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("system_show"))

        @system.command(name="set", description="Set the system prompt")
        @app_commands.describe(text="The new system prompt")
        async def set_(interaction: discord.Interaction, text: str) -> None:
            await self._run_command(interaction, Command("system_set", text))

        @system.command(name="clear", description="Go back to the default system prompt")
        async def clear(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("system_clear"))

        tree.add_command(system)

        history = app_commands.Group(
            name="history", description="How much of a conversation is sent (this channel's)"
        )

        @history.command(name="show", description="What each request in this channel sends")
        async def history_show(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("history_show"))

        @history.command(name="set", description="Choose this channel's history strategy")
        @app_commands.describe(
            strategy="count: newest messages; tokens: a token budget; summary: summary + budget",
            limit="messages for count, tokens for tokens and summary (default: the bot's)",
        )
        async def history_set(
            interaction: discord.Interaction,
            strategy: Literal["count", "tokens", "summary"],
            limit: app_commands.Range[int, 1, 1_000_000] | None = None,
        ) -> None:
            words = f"history {strategy}" + ("" if limit is None else f" {limit}")
            # The typed form's parser checks the limit's range for the strategy.
            await self._run_command(interaction, parse_command(words) or Command("help"))

        @history.command(name="clear", description="Go back to the bot's default history")
        async def history_clear(interaction: discord.Interaction) -> None:
            await self._run_command(interaction, Command("history_clear"))

        tree.add_command(history)

        @tree.command(name="model", description="Show or choose the model of this conversation")
        @app_commands.describe(
            name="A model to answer from now on, or clear for the default (empty: show)"
        )
        async def model(interaction: discord.Interaction, name: str | None = None) -> None:
            await self._run_command(interaction, model_command(name))

        @model.autocomplete("name")
        async def model_names_offered(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            names = model_choices(model_names(self.settings), current)
            return [app_commands.Choice(name=name, value=name) for name in names]

        @tree.context_menu(name="Regenerate")
        async def regenerate(interaction: discord.Interaction, message: discord.Message) -> None:
            await self.regenerate_command(interaction, message)

    async def sync_commands(self) -> bool:
        """Register the commands in DISCORD_COMMAND_GUILDS (instant) or globally, if they changed.

        Returns whether anything was pushed; an unchanged set is left alone (each bulk overwrite
        counts against a daily limit, and global ones take time to reach clients).
        """
        targets: list[discord.abc.Snowflake | None] = [
            discord.Object(id=int(g)) for g in self.settings.discord_command_guilds
        ] or [None]
        pushed = False
        for guild in targets:
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            local = [c.to_dict(self.tree) for c in self.tree.get_commands(guild=guild)]
            remote = [c.to_dict() for c in await self.tree.fetch_commands(guild=guild)]
            where = f"guild {guild.id}" if guild is not None else "globally"
            if not commands_differ(local, remote):  # type: ignore[arg-type]
                log.debug("app commands %s are up to date", where)
                continue
            await self.tree.sync(guild=guild)
            pushed = True
            log.info("synced %d app commands %s", len(local), where)
        return pushed

    def _command_target(self, interaction: discord.Interaction) -> ConversationKey | ChannelTarget:
        channel_id = interaction.channel_id or 0
        if interaction.guild_id is None:
            return ConversationKey(PLATFORM, DM_WORKSPACE, str(channel_id))
        channel = interaction.channel
        if channel is not None and channel.type in THREAD_TYPES:
            parent = getattr(channel, "parent_id", None) or channel_id
            return ConversationKey(
                PLATFORM, str(interaction.guild_id), str(parent), str(channel_id)
            )
        return ChannelTarget(PLATFORM, str(interaction.guild_id), str(channel_id))

    async def _run_command(self, interaction: discord.Interaction, command: Command) -> None:
        target = self._command_target(interaction)
        deferred = False

        async def manages_channels() -> bool:
            # The invoking member's permissions in this channel, as Discord sends them.
            return interaction.permissions.manage_channels

        async def defer() -> None:
            # Not answered within the interaction's 3 s: say "thinking" now, edit later.
            nonlocal deferred
            deferred = True
            await interaction.response.defer(ephemeral=True, thinking=True)

        answer = await self.door.command(
            command,
            target,
            acknowledge=defer,
            user_id=str(interaction.user.id),
            direct=interaction.guild_id is None,
            may_change_channel=manages_channels,
        )
        answer = answer[: DiscordReply.max_chars]
        if deferred:
            await interaction.edit_original_response(content=answer)
        else:
            await interaction.response.send_message(answer, ephemeral=True)

    # -- Stop and Regenerate -------------------------------------------------------------------

    async def stop_clicked(
        self, interaction: discord.Interaction[Any], key: ConversationKey
    ) -> None:
        """Stop on a streaming answer (``bots.discord.controls.stop_button``)."""
        # Acknowledged first, within Discord's 3 s (type 6: the message stays as it is).
        await interaction.response.defer()
        try:
            stopped = await self.door.stop(key, user_id=str(interaction.user.id))
        except Exception:
            log.exception("stopping the answer in %s failed", key)
            await interaction.followup.send(ACTION_FAILED, ephemeral=True)
            return
        if not stopped:
            await interaction.followup.send(NOTHING_TO_STOP, ephemeral=True)

    async def regenerate_clicked(
        self, interaction: discord.Interaction[Any], key: ConversationKey, message_id: str
    ) -> None:
        """Regenerate on an answer's last message (``bots.discord.controls.regenerate_button``)."""
        await interaction.response.defer()
        refusal = await self._regenerate(interaction, key, message_id)
        if refusal is not None:
            await interaction.followup.send(refusal, ephemeral=True)

    async def regenerate_command(
        self, interaction: discord.Interaction[Any], message: discord.Message
    ) -> None:
        """The message context-menu command "Regenerate" on one of the bot's answers."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        key = self.answer_key(interaction, message)
        if key is None:
            refusal: str | None = NOT_AN_ANSWER
        else:
            refusal = await self._regenerate(interaction, key, str(message.id))
        if refusal is None:
            # The answer changing in place says it all: no "thinking" left behind.
            await interaction.delete_original_response()
        else:
            await interaction.edit_original_response(content=refusal[: DiscordReply.max_chars])

    def answer_key(
        self, interaction: discord.Interaction[Any], message: discord.Message
    ) -> ConversationKey | None:
        """The conversation of the bot's answer ``message`` (None: not the bot's, or unknown)."""
        me = self.user
        if me is None or message.author.id != me.id:
            return None
        key = key_on(message)
        if key is not None:
            return key
        channel = interaction.channel
        if interaction.guild_id is None:
            return ConversationKey(PLATFORM, DM_WORKSPACE, str(interaction.channel_id))
        if isinstance(channel, discord.Thread):
            return self._thread_key(channel)
        reference = message.reference
        if reference is not None and reference.message_id is not None:
            # An answer in the channel replies to its question, whose id names the conversation.
            return ConversationKey(
                PLATFORM,
                str(interaction.guild_id),
                str(interaction.channel_id),
                str(reference.message_id),
            )
        return None

    async def _regenerate(
        self, interaction: discord.Interaction[Any], key: ConversationKey, message_id: str
    ) -> str | None:
        """Answer again in place of answer ``message_id``; a refusal for the clicker, or None."""
        channel: discord.abc.Messageable
        if isinstance(interaction.channel, discord.abc.Messageable):
            channel = interaction.channel
        else:
            channel = self.get_partial_messageable(
                interaction.channel_id or int(key.thread or key.channel),
                guild_id=interaction.guild_id,
            )
        surface = DiscordReply(channel, key=key)
        user_id = str(interaction.user.id)

        async def run() -> str | None:
            try:
                return await self.door.regenerate(key, message_id, user_id=user_id, surface=surface)
            except Exception:
                log.exception("regenerating answer %s in %s failed", message_id, key)
                return ACTION_FAILED

        # Work in flight: ``drain`` waits for it, ``close`` ends it.
        task: asyncio.Task[str | None] = self.door.spawn(run(), name=f"discord regenerate {key}")
        return await task

    # -- messages ------------------------------------------------------------------------------

    def _addressed(self, message: discord.Message) -> bool:
        """Cheap checks on the gateway's task: is this a person's message worth a look?"""
        me = self.user
        if me is None or message.author.id == me.id:
            return False
        if message.author.bot or message.webhook_id is not None:
            return False
        return message.type in CONVERSATIONAL_TYPES

    def mentions_me(self, message: discord.Message) -> bool:
        """The message mentions the bot's user or the bot's own role."""
        if self.user is not None and self.user.id in message.raw_mentions:
            return True
        role = message.guild.self_role if message.guild is not None else None
        return role is not None and role.id in message.raw_role_mentions

    def strip_mentions(self, message: discord.Message) -> str:
        """The message's text without mentions of the bot (user or role)."""
        assert self.user is not None
        text = re.sub(rf"<@!?{self.user.id}>", " ", message.content)
        role = message.guild.self_role if message.guild is not None else None
        if role is not None:
            text = text.replace(f"<@&{role.id}>", " ")
        return text.strip()

    async def on_message(self, message: discord.Message) -> None:
        if self._addressed(message):
            self.door.receive(DiscordArrival(self, message))

    @staticmethod
    def _thread_key(thread: discord.Thread) -> ConversationKey:
        return ConversationKey(
            PLATFORM, str(thread.guild.id), str(thread.parent_id), str(thread.id)
        )

    async def open_thread(
        self, message: discord.Message, channel: discord.TextChannel, text: str
    ) -> discord.Thread | None:
        """Start a thread on the message; None when the bot may not (it answers in the channel)."""
        try:
            return await message.create_thread(
                name=thread_name(text), auto_archive_duration=THREAD_ARCHIVE_MINUTES
            )
        except discord.Forbidden as error:
            me = channel.guild.me
            allowed = channel.permissions_for(me) if me is not None else None
            missing = [
                p.replace("_", " ").title()
                for p in THREAD_PERMISSIONS
                if allowed is None or not getattr(allowed, p)
            ] or ["Create Public Threads", "Send Messages in Threads"]
            log.warning(
                "cannot open a thread in #%s (%s) of %s: Discord said %r; the bot needs %s there. "
                "Answering as a reply in the channel instead.",
                channel.name, channel.id, channel.guild.name, error.text, " and ".join(missing),
            )  # fmt: skip
            return None
        except discord.HTTPException as error:
            if error.code != THREAD_ALREADY_CREATED:
                log.warning("could not open a thread on %s (%s); answering in the channel",
                            message.id, error)  # fmt: skip
                return None
        # A thread started on a message has the message's id (a redelivered message lands here).
        thread = channel.guild.get_thread(message.id)
        if thread is None:
            with contextlib.suppress(discord.HTTPException):
                fetched = await self.fetch_channel(message.id)
                if isinstance(fetched, discord.Thread):
                    thread = fetched
        return thread

    async def thread_lines(
        self, thread: discord.Thread, message: discord.Message
    ) -> list[ThreadLine]:
        """Earlier messages of a thread the bot joins late, oldest first."""
        me = self.user
        earlier: list[ThreadLine] = []
        try:
            async for past in thread.history(limit=THREAD_CONTEXT_MESSAGES, before=message):
                from_bot = me is not None and past.author.id == me.id
                text = self.strip_mentions(past)
                earlier.append(ThreadLine(past.author.display_name, text, from_bot=from_bot))
        except discord.HTTPException as error:
            log.warning("could not read the history of thread %s: %s", thread.id, error)
        return earlier[::-1]


class DiscordArrival:
    """One Discord message, translated for the front door (``core.bot.Arrival``)."""

    def __init__(self, bot: DiscordBot, message: discord.Message) -> None:
        self.bot = bot
        self.message = message
        self.user_id = str(message.author.id)
        self.message_id: str | None = str(message.id)
        # Read by the front door, which inlines text files and sends images to vision models.
        self.attachments = tuple(attachment(file) for file in message.attachments)
        channel = message.channel
        thread = isinstance(channel, discord.Thread)
        self.facts = Facts(
            direct=message.guild is None, mentioned=bot.mentions_me(message), in_thread=thread
        )
        if message.guild is None:
            self.key = ConversationKey(PLATFORM, DM_WORKSPACE, str(channel.id))
        elif isinstance(channel, discord.Thread):
            self.key = DiscordBot._thread_key(channel)
        else:
            # A thread opened on the message has the message's id; so has a reply in place.
            self.key = ConversationKey(
                PLATFORM, str(message.guild.id), str(channel.id), str(message.id)
            )

    @property
    def place(self) -> str:
        """Where an answer can go if this turn is taken over before its reply began: the
        message's own channel (``core.bot.Placed``; the reply's surface records the thread)."""
        return place_of(self.message.channel.id, self.key)

    async def question(self) -> str:
        """The message's text, mentions of the bot taken out (files: ``attachments``)."""
        return self.bot.strip_mentions(self.message)

    async def thread(self) -> Sequence[ThreadLine]:
        channel = self.message.channel
        if not isinstance(channel, discord.Thread):
            return []
        return await self.bot.thread_lines(channel, self.message)

    async def reply(self, route: Route) -> DiscordReply:
        message, channel = self.message, self.message.channel
        if not route.new_thread:
            return DiscordReply(channel, key=self.key)
        asked = bool(self.bot.strip_mentions(message) or message.attachments)
        if asked and isinstance(channel, discord.TextChannel):
            thread = await self.bot.open_thread(message, channel, self.bot.strip_mentions(message))
            if thread is not None:
                return DiscordReply(thread, key=self.key)
        # No thread (an empty mention, or not allowed here): answer as a reply in the channel.
        return DiscordReply(channel, reference=message, key=self.key)

    async def may_change_channel(self) -> bool:
        """Whether the writer has Manage Channels here (a thread: in its parent channel)."""
        author, channel = self.message.author, self.message.channel
        if not isinstance(author, discord.Member) or isinstance(
            channel, discord.abc.PrivateChannel
        ):
            return False
        return channel.permissions_for(author).manage_channels
