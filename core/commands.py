"""The commands users type, platform-neutral: reset, system show|set|clear, help.

Adapters turn a slash command, an app command or a mention's words into a ``Command`` and hand it
to ``ChatEngine.run_command`` with its target: a conversation (a DM, a thread) or a channel's
defaults for new threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["reset", "system_show", "system_set", "system_clear", "help"]

#: Longest system prompt accepted, in characters.
MAX_SYSTEM_PROMPT_CHARS = 8000


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command; ``text`` is the new system prompt for ``system_set``."""

    action: Action
    text: str = ""


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


def help_text(command_prefix: str = "/chatbot ") -> str:
    """What the help command answers; ``command_prefix`` is how commands are typed here."""
    p = command_prefix
    return (
        "I answer in threads: mention me with a question and reply in the thread to continue.\n"
        f"• `{p}reset` — start this conversation over\n"
        f"• `{p}system` — show the system prompt in use\n"
        f"• `{p}system <text>` — set the system prompt\n"
        f"• `{p}system clear` — go back to the default system prompt\n"
        f"• `{p}help` — this help\n"
        "In a thread, mention me followed by the same words (`reset`, `system ...`) to act on "
        "that thread; in a channel, the commands set the defaults for new threads."
    )
