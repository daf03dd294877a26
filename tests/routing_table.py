"""Where the bot answers: one table, run through every platform's adapter over its wire fake.

Each row is a message somewhere (a DM, the top of a channel, a thread the bot answers in, a
thread it has never been in), mentioning the bot or not, with ``REQUIRE_MENTION`` on or off, and
what must happen: an answer from the model, a command's answer, or silence. The README's routing
table says the same in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Where = Literal["dm", "channel", "bot_thread", "other_thread"]
Mention = Literal["none", "user", "role"]
Expect = Literal["answer", "command", "silent"]

#: What the model answers in every routed case (so an answer is told from a command's reply).
MODEL_ANSWER = "Routed to the model."
#: The start of the reset command's answer.
RESET_ANSWER = "Conversation reset"


@dataclass(frozen=True, slots=True)
class Case:
    where: Where
    mention: Mention
    text: str
    expect: Expect
    require_mention: bool = False

    @property
    def id(self) -> str:
        flags = "-require_mention" if self.require_mention else ""
        return f"{self.where}-{self.mention}-{self.text.replace(' ', '_')}{flags}"


CASES = (
    Case("dm", "none", "what is a monad?", "answer"),
    Case("dm", "none", "reset", "command"),
    Case("channel", "user", "what is a monad?", "answer"),
    Case("channel", "role", "what is a monad?", "answer"),
    Case("channel", "none", "what is a monad?", "silent"),
    Case("bot_thread", "none", "and then?", "answer"),
    Case("bot_thread", "none", "and then?", "silent", require_mention=True),
    Case("bot_thread", "user", "and then?", "answer", require_mention=True),
    # A bare word in a shared thread is a question; a mention makes it a command.
    Case("bot_thread", "none", "reset", "answer"),
    Case("bot_thread", "user", "reset", "command"),
    Case("other_thread", "none", "anyone?", "silent"),
    Case("other_thread", "user", "anyone?", "answer"),
)


def outcome(replies: list[str]) -> Expect:
    """What the bot did, from the texts of the messages it posted for the routed message."""
    if not replies:
        return "silent"
    joined = "\n".join(replies)
    if RESET_ANSWER in joined:
        return "command"
    assert MODEL_ANSWER in joined, replies
    return "answer"
