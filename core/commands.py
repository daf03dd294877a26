"""The commands users type, platform-neutral: reset, system, history, model, streaming, help:
parsing and running.

Adapters turn a slash command, an app command or a mention's words into a ``Command`` and hand it
to the front door (``core.bot``) with its target: a conversation (a DM, a thread) or a channel's
defaults for new threads. ``CommandRunner`` does it; how help is worded on each platform comes
from the platform's ``HelpStyle``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from core.config import HISTORY_STRATEGIES, SLACK_STREAMING_MODES, Settings
from core.conversation import ConversationKey
from core.history import effective_history
from core.models import describe_choices, find_model, resolve_model
from core.store import DEPLOYMENT_SYSTEM_PROMPT, Conversation, ConversationStore

Action = Literal[
    "reset",
    "system_show",
    "system_set",
    "system_clear",
    "history_show",
    "history_set",
    "history_clear",
    "model_show",
    "model_set",
    "model_clear",
    "streaming_show",
    "streaming_set",
    "streaming_clear",
    "help",
]

#: Longest system prompt accepted, in characters.
MAX_SYSTEM_PROMPT_CHARS = 8000
#: Bounds of a channel's history limits: messages under ``count``, tokens under the others.
HISTORY_MESSAGES_RANGE = (1, 500)
HISTORY_TOKENS_RANGE = (256, 1_000_000)
#: What each ``streaming`` mode does, for the command's answers.
STREAMING_MODES = {
    "native": "stream natively (the platform's own streaming messages)",
    "update": "appear in a message edited as the answer grows",
    "auto": "stream natively where only the asker reads them (DMs), else in an edited message",
}
#: Where a conversation's system prompt or model comes from, in words.
SETTING_SOURCES = {
    "conversation": "set for this conversation",
    "channel": "this channel's default",
    "default": "the bot's default",
}
#: Shown in a reply cut short by a reset.
CANCELLED_BY_RESET = "Stopped: the conversation was reset."


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command.

    ``text`` is the new system prompt for ``system_set``, the strategy name for ``history_set``
    (with ``limit``: messages under ``count``, tokens otherwise; None keeps the deployment's
    figure), the model's name for ``model_set``, the mode for ``streaming_set``. ``problem`` says what was wrong when a command was mistyped.
    """

    action: Action
    text: str = ""
    limit: int | None = None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class ChannelTarget:
    """A command aimed at a channel's defaults for new threads rather than one conversation."""

    platform: str
    workspace: str
    channel: str


def parse_command(text: str) -> Command | None:
    """The command ``text`` spells, or None when it is an ordinary message.

    Only whole-message forms count, so "help me with this" stays a question:
    ``reset``, ``help``, ``system``, ``system show``, ``system clear``, ``system set <text>`` and
    ``system <text>``, ``model``, ``model <name>``, ``model clear``, ``streaming``,
    ``streaming native|update|auto|clear``; a leading ``/`` is allowed.
    """
    stripped = text.strip()
    if stripped.startswith("/"):
        stripped = stripped[1:]
    word, _, rest = stripped.partition(" ")
    word = word.lower()
    rest = rest.strip()
    if word in ("reset", "help") and not rest:
        return Command("reset" if word == "reset" else "help")
    if word == "history":
        return _parse_history(rest)
    if word in ("model", "streaming"):
        # One word at most after it: "model the data for me" stays a question.
        if len(rest.split()) > 1:
            return None
        return _parse_model(rest) if word == "model" else _parse_streaming(rest)
    if word != "system":
        # "system\n<text>" splits on the newline, not the space.
        word, _, rest = stripped.partition("\n")
        if word.strip().lower() != "system":
            return None
        rest = rest.strip()
    sub, _, value = rest.partition(" ")
    if not rest or (sub.lower() == "show" and not value.strip()):
        return Command("system_show")
    if sub.lower() == "clear" and not value.strip():
        return Command("system_clear")
    if sub.lower() == "set":
        return Command("system_set", value.strip()) if value.strip() else Command("help")
    return Command("system_set", rest)


def _parse_model(rest: str) -> Command:
    if not rest or rest.lower() == "show":
        return Command("model_show")
    if rest.lower() in ("clear", "default"):
        return Command("model_clear")
    return Command("model_set", rest)


def _parse_streaming(rest: str) -> Command:
    mode = rest.lower()
    if not mode or mode == "show":
        return Command("streaming_show")
    if mode in ("clear", "default"):
        return Command("streaming_clear")
    if mode in SLACK_STREAMING_MODES:
        return Command("streaming_set", mode)
    return Command(
        "help",
        problem=f"I don't know the streaming mode {rest!r}: use `native`, `update` or `auto`.",
    )


def _parse_history(rest: str) -> Command:
    words = rest.lower().split()
    if not words or words == ["show"]:
        return Command("history_show")
    if words in (["clear"], ["default"]):
        return Command("history_clear")
    strategy, numbers = words[0], words[1:]
    usage = (
        "Use `history count <messages>`, `history tokens <tokens>` or `history summary <tokens>`."
    )
    if strategy not in HISTORY_STRATEGIES or len(numbers) > 1:
        return Command("help", problem=f"I don't know that history setting. {usage}")
    if not numbers:
        return Command("history_set", strategy)
    low, high = HISTORY_MESSAGES_RANGE if strategy == "count" else HISTORY_TOKENS_RANGE
    unit = "messages" if strategy == "count" else "tokens"
    if not numbers[0].replace(",", "").replace("_", "").isdigit():
        return Command("help", problem=f"{numbers[0]!r} is not a number of {unit}. {usage}")
    limit = int(numbers[0].replace(",", "").replace("_", ""))
    if not low <= limit <= high:
        return Command(
            "help", problem=f"The number of {unit} must be between {low:,} and {high:,}."
        )
    return Command("history_set", strategy, limit)


@dataclass(frozen=True, slots=True)
class HelpStyle:
    """How commands are typed on a platform, for the help text (part of its profile).

    ``prefix`` is what goes before a command word (``"/chatbot "`` on Slack, ``"/"`` for app
    commands and the terminal); ``app_commands`` lists subcommand forms (``system show``,
    ``system set <text>``) instead of typed words (``system``, ``system <text>``); ``threads``
    says how commands act in threads and channels (not in the terminal); ``native_streams``
    says whether the platform has native streams (Slack), which the ``streaming`` command picks.
    """

    prefix: str = "/"
    app_commands: bool = False
    threads: bool = True
    native_streams: bool = False


def help_text(style: HelpStyle) -> str:
    """What the help command answers, in the platform's own command forms."""
    p = style.prefix
    if style.app_commands:
        system = (
            f"• `{p}system show` — the system prompt in use\n"
            f"• `{p}system set <text>` — set the system prompt\n"
            f"• `{p}system clear` — go back to the default system prompt\n"
        )
        history = (
            f"• `{p}history show` — how much of the conversation is sent (this channel's setting)\n"
            f"• `{p}history set <count|tokens|summary> [limit]`, `{p}history clear` — change it "
            "for this channel\n"
        )
    else:
        system = (
            f"• `{p}system` — show the system prompt in use\n"
            f"• `{p}system <text>` — set the system prompt\n"
            f"• `{p}system clear` — go back to the default system prompt\n"
        )
        history = (
            f"• `{p}history` — how much of the conversation is sent (this channel's setting)\n"
            f"• `{p}history count 30`, `{p}history tokens 6000`, `{p}history summary 6000`, "
            f"`{p}history clear` — change it for this channel\n"
        )
    intro = (
        "I answer in threads: mention me with a question and reply in the thread to continue.\n"
        if style.threads
        else ""
    )
    outro = (
        "In a thread, mention me followed by the same words (`reset`, `system ...`) to act on "
        "that thread; in a channel, the commands set the defaults for new threads."
        if style.threads
        else ""
    )
    where = "this conversation" if not style.threads else "this conversation or channel"
    model = (
        f"• `{p}model` — the model answering here and the choices\n"
        f"• `{p}model <name>`, `{p}model clear` — pick a model for {where}, or go back to the "
        "default\n"
    )
    streaming = (
        f"• `{p}streaming`, `{p}streaming native|update|auto`, `{p}streaming clear` — how "
        "answers stream in this channel (native streams, or a message edited as it grows)\n"
        if style.native_streams
        else ""
    )
    lines = f"• `{p}reset` — start this conversation over\n" + system + history + model + streaming
    return (intro + lines + f"• `{p}help` — this help\n" + outro).rstrip("\n")


def changes_channel(command: Command, target: ConversationKey | ChannelTarget) -> bool:
    """Whether ``command`` changes a channel's defaults (platforms may ask for rights)."""
    if command.action in ("history_set", "history_clear", "streaming_set", "streaming_clear"):
        # History and streaming settings always belong to the channel, even from a thread.
        return True
    return command.action in (
        "system_set",
        "system_clear",
        "model_set",
        "model_clear",
    ) and isinstance(target, ChannelTarget)


def system_prompt_for(
    settings: Settings,
    conversation: Conversation,
    channel_prompt: str | None,
    deployment_prompt: str | None = None,
) -> tuple[str, str]:
    """The system prompt in use and where it comes from: conversation, channel or default.

    The default is the deployment's own (a shipped experiment variant, kept in the database:
    ``deployment_prompt``) over ``SYSTEM_PROMPT``.
    """
    if conversation.system_prompt:
        return conversation.system_prompt, "conversation"
    if channel_prompt:
        return channel_prompt, "channel"
    return deployment_prompt or settings.system_prompt, "default"


class CommandRunner:
    """Runs commands against the store. ``stop_turn(conversation_id, note)`` cancels a turn in
    progress (a reset); ``help_styles`` maps a platform name to its help wording."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        stop_turn: Callable[[int, str], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self._stop_turn = stop_turn
        self.help_styles: dict[str, HelpStyle] = {}

    async def run(self, command: Command, target: ConversationKey | ChannelTarget) -> str:
        """Do ``command`` on a conversation or on a channel's defaults; the answer to show."""
        if command.action == "help":
            text = help_text(self.help_styles.get(target.platform, HelpStyle()))
            return f"{command.problem}\n\n{text}" if command.problem else text
        if command.action.startswith("history_"):
            return await self._history_command(command, target)
        if command.action.startswith("model_"):
            return await self._model_command(command, target)
        if command.action.startswith("streaming_"):
            return await self._streaming_command(command, target)
        if command.action == "system_set" and len(command.text) > MAX_SYSTEM_PROMPT_CHARS:
            return (
                f"That system prompt is {len(command.text):,} characters; the limit is "
                f"{MAX_SYSTEM_PROMPT_CHARS:,}."
            )
        if isinstance(target, ChannelTarget):
            return await self._channel_command(command, target)
        conversation, _ = await self.store.get_or_create(target)
        if command.action == "reset":
            self._stop_turn(conversation.id, CANCELLED_BY_RESET)
            await self.store.reset(conversation.id)
            return "Conversation reset: I've forgotten what we said here. The next message starts afresh."
        if command.action == "system_set":
            await self.store.set_system_prompt(conversation.id, command.text)
            return f"System prompt for this conversation set to:\n> {_quote(command.text)}"
        if command.action == "system_clear":
            await self.store.set_system_prompt(conversation.id, None)
            channel = await self.store.channel_settings(
                target.platform, target.workspace, target.channel
            )
            prompt, variant = system_prompt_for(
                self.settings,
                await self.store.get(conversation.id),
                channel.system_prompt,
                await self.store.deployment_setting(DEPLOYMENT_SYSTEM_PROMPT),
            )
            where = "this channel's default" if variant == "channel" else "the default"
            return f"System prompt cleared; this conversation now uses {where}:\n> {_quote(prompt)}"
        channel = await self.store.channel_settings(
            target.platform, target.workspace, target.channel
        )
        prompt, variant = system_prompt_for(
            self.settings,
            conversation,
            channel.system_prompt,
            await self.store.deployment_setting(DEPLOYMENT_SYSTEM_PROMPT),
        )
        source = SETTING_SOURCES[variant]
        return f"System prompt ({source}):\n> {_quote(prompt)}"

    async def _history_command(
        self, command: Command, target: ConversationKey | ChannelTarget
    ) -> str:
        """History settings belong to a channel: in a thread or DM, to the one it lives in."""
        where = (target.platform, target.workspace, target.channel)
        if command.action == "history_set":
            limit = command.limit
            values: dict[str, Any] = {"history_strategy": command.text}
            if command.text == "count":
                values["max_history_messages"] = limit
            elif limit is not None:
                values["max_history_tokens"] = limit
            await self.store.update_channel_settings(*where, **values)
        elif command.action == "history_clear":
            await self.store.update_channel_settings(
                *where, history_strategy=None, max_history_messages=None, max_history_tokens=None
            )
        setting = effective_history(self.settings, await self.store.channel_settings(*where))
        described = setting.describe()
        source = "this channel's setting" if setting.own else "the bot's default"
        prefix = {"history_set": "Done. ", "history_clear": "Back to the default. "}.get(
            command.action, ""
        )
        return f"{prefix}Each request here sends {described} ({source})."

    async def _model_command(
        self, command: Command, target: ConversationKey | ChannelTarget
    ) -> str:
        """The conversation's model (a thread, a DM) or a channel's default for new threads."""
        settings = self.settings
        where = (target.platform, target.workspace, target.channel)
        choices = describe_choices(settings)
        if command.action == "model_set":
            choice = find_model(settings, command.text)
            if choice is None:
                return f"I don't know the model `{command.text}`. The choices: {choices}."
            value: str | None = choice.name
        else:
            value = None
        if isinstance(target, ChannelTarget):
            if command.action != "model_show":
                await self.store.update_channel_settings(*where, model=value)
            channel = await self.store.channel_settings(*where)
            choice, source = resolve_model(settings, None, channel.model)
            done = {"model_set": "Done. ", "model_clear": "Back to the default. "}.get(
                command.action, ""
            )
            own = "this channel's default" if source == "channel" else "the bot's default"
            return (
                f"{done}New conversations in this channel use `{choice.name}` ({own}). "
                f"The choices: {choices}."
            )
        conversation, _ = await self.store.get_or_create(target)
        if command.action != "model_show":
            await self.store.set_conversation_model(conversation.id, value)
            conversation = await self.store.get(conversation.id)
        channel = await self.store.channel_settings(*where)
        choice, source = resolve_model(settings, conversation.model, channel.model)
        done = {"model_set": "Done. ", "model_clear": "Back to the default. "}.get(
            command.action, ""
        )
        own = SETTING_SOURCES[source]
        return f"{done}This conversation uses `{choice.name}` ({own}). The choices: {choices}."

    async def _streaming_command(
        self, command: Command, target: ConversationKey | ChannelTarget
    ) -> str:
        """How answers stream in a channel: only where the platform has native streams."""
        style = self.help_styles.get(target.platform, HelpStyle())
        if not style.native_streams:
            return (
                "Answers here always appear in a message that grows as it is written; this "
                "platform has no native streams to choose."
            )
        where = (target.platform, target.workspace, target.channel)
        if command.action == "streaming_set":
            await self.store.update_channel_settings(*where, streaming=command.text)
        elif command.action == "streaming_clear":
            await self.store.update_channel_settings(*where, streaming=None)
        mode = (await self.store.channel_settings(*where)).streaming
        done = {"streaming_set": "Done. ", "streaming_clear": "Back to the default. "}.get(
            command.action, ""
        )
        own = "this channel's setting" if mode is not None else "the bot's default"
        # The deployment's mode: SLACK_STREAMING (Slack is the platform with native streams).
        mode = mode or self.settings.slack_streaming
        return f"{done}Answers in this channel {STREAMING_MODES[mode]} (`{mode}`, {own})."

    async def _channel_command(self, command: Command, target: ChannelTarget) -> str:
        channel = await self.store.channel_settings(
            target.platform, target.workspace, target.channel
        )
        if command.action == "reset":
            return (
                "Each thread is its own conversation, and a new thread always starts afresh. "
                "To reset a thread, mention me in it and say `reset`."
            )
        if command.action == "system_set":
            await self.store.update_channel_settings(
                target.platform, target.workspace, target.channel, system_prompt=command.text
            )
            return f"Default system prompt for new threads in this channel set to:\n> {_quote(command.text)}"
        if command.action == "system_clear":
            await self.store.update_channel_settings(
                target.platform, target.workspace, target.channel, system_prompt=None
            )
            return (
                "This channel's default system prompt is cleared; new threads use the bot's "
                f"default:\n> {_quote(await self._default_prompt())}"
            )
        if channel.system_prompt:
            return f"Default system prompt for new threads in this channel:\n> {_quote(channel.system_prompt)}"
        return (
            "This channel has no default system prompt of its own; new threads use the bot's "
            f"default:\n> {_quote(await self._default_prompt())}"
        )

    async def _default_prompt(self) -> str:
        """The deployment's default: a shipped variant's prompt, else ``SYSTEM_PROMPT``."""
        shipped = await self.store.deployment_setting(DEPLOYMENT_SYSTEM_PROMPT)
        return shipped or self.settings.system_prompt


def _quote(text: str) -> str:
    return text.replace("\n", "\n> ")
