"""The commands users type, platform-neutral: reset, system show|set|clear, help.

Adapters turn a slash command, an app command or a mention's words into a ``Command`` and hand it
to ``ChatEngine.run_command`` with its target: a conversation (a DM, a thread) or a channel's
defaults for new threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal[
    "reset",
    "system_show",
    "system_set",
    "system_clear",
    "history_show",
    "history_set",
    "history_clear",
    "help",
]

#: Longest system prompt accepted, in characters.
MAX_SYSTEM_PROMPT_CHARS = 8000
#: Bounds of a channel's history limits: messages under ``count``, tokens under the others.
HISTORY_MESSAGES_RANGE = (1, 500)
HISTORY_TOKENS_RANGE = (256, 1_000_000)
HISTORY_STRATEGY_NAMES = ("count", "tokens", "summary")


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command.

    ``text`` is the new system prompt for ``system_set``, or the strategy name for
    ``history_set`` (with ``limit``: messages under ``count``, tokens otherwise; None keeps the
    deployment's figure). ``problem`` says what was wrong when a command was mistyped.
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
    ``system <text>``; a leading ``/`` is allowed.
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
    if strategy not in HISTORY_STRATEGY_NAMES or len(numbers) > 1:
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


def help_text(command_prefix: str = "/chatbot ", *, app_commands: bool = False) -> str:
    """What the help command answers; ``command_prefix`` is how commands are typed here.

    ``app_commands`` lists the forms of Discord's app commands (``/system set <text>``) instead
    of typed words (``/chatbot system <text>``).
    """
    p = command_prefix
    if app_commands:
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
    return (
        "I answer in threads: mention me with a question and reply in the thread to continue.\n"
        f"• `{p}reset` — start this conversation over\n"
        + system
        + history
        + f"• `{p}help` — this help\n"
        "In a thread, mention me followed by the same words (`reset`, `system ...`) to act on "
        "that thread; in a channel, the commands set the defaults for new threads."
    )
