"""Between Slack's text and Markdown, both ways.

Outgoing: the model writes standard Markdown, and Slack renders standard Markdown itself in a
``markdown`` block (chat.postMessage / chat.update) and in ``markdown_text`` (chat.startStream /
appendStream / stopStream). So answers are sent as Markdown, unconverted: code blocks, bold,
lists, links, headings and tables come out as the model meant them, the two streaming paths show
the same thing, and appends stay chunk-safe (no conversion can straddle a chunk boundary).
Converting to mrkdwn instead would lose headings, nested lists and tables, and cap a message at
~4,000 characters instead of 12,000. The only mrkdwn we write is the plain ``text`` fallback that
notifications and old clients show (``fallback_text``), escaped as mrkdwn requires.

Nothing the model writes may notify anyone: Slack turns ``<!channel>``, ``<!here>``,
``<!everyone>``, ``<!subteam^ID>`` and ``<@U123>`` into pings in every field (``text``, markdown
blocks, ``markdown_text``), so a prompt-injected answer could page a whole channel.
``neutralise_mentions`` rewrites each such token as the words a person reads (``@channel``,
``@here``, the label or id) with a word joiner after the ``@``: the same text to the eye, no
token for Slack. It is ``SlackReply.render``, which the streamer applies to each message's whole
text, so a token split across two appends (``<!chan`` + ``nel>``) is still seen whole.

Incoming: Slack sends message text as mrkdwn with ``&``, ``<`` and ``>`` escaped and links,
mentions and channels in angle brackets; ``to_plain`` turns it into what the person typed.
"""

from __future__ import annotations

import re
from typing import Any

#: A markdown block holds standard Markdown; all markdown blocks of one payload hold at most
#: 12,000 characters together (docs.slack.dev Block Kit "Markdown block").
MAX_MARKDOWN_CHARS = 12_000
#: The ``text`` fallback is only what a notification shows; Slack answers msg_too_long from about
#: 4,000 characters of ``text`` (docs.slack.dev chat.postMessage, "Truncating content").
FALLBACK_CHARS = 300

#: U+2060 WORD JOINER: invisible and unbreakable, placed between "@" and a name so Slack shows
#: "@channel" yet finds no mention in it.
WORD_JOINER = "\u2060"
#: The tokens that notify (docs.slack.dev "Formatting message text": "Mentioning users",
#: "Mentioning groups", "Special mentions"; ``<!group>`` is the old name of ``<!channel>``).
_PING = re.compile(
    r"<(?:!(?P<special>here|channel|everyone|group)|!subteam\^(?P<team>[^|>]*)|@(?P<user>[^|>]*))"
    r"(?:\|(?P<label>[^>]*))?>",
    re.IGNORECASE,
)
_MENTION = re.compile(r"<@(\w+)(?:\|([^>]*))?>")
_CHANNEL = re.compile(r"<#(\w+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!([a-z]+)(?:\^[^|>]*)?(?:\|([^>]*))?>")
_LINK = re.compile(r"<((?:https?|mailto|tel):[^|>]+)(?:\|([^>]*))?>")
_MD_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_MD_EMPHASIS = re.compile(r"(\*\*|__|~~)(.+?)\1")
_MD_HEADING = re.compile(r"^#{1,6}\s+", re.MULTILINE)


def markdown_blocks(text: str) -> list[dict[str, Any]]:
    """One ``markdown`` block holding ``text`` (standard Markdown, at most 12,000 characters)."""
    return [{"type": "markdown", "text": text}]


#: The action id of the feedback buttons under every answer (``SlackBot`` listens for it).
FEEDBACK_ACTION_ID = "threadbot_feedback"
#: The callback id of the optional "what went wrong?" modal after a thumbs-down.
REASON_CALLBACK_ID = "threadbot_feedback_reason"
REASON_BLOCK_ID = "reason"
REASON_ACTION_ID = "reason_input"
#: Slack's plain-text input takes up to 3,000 characters (Block Kit "Plain-text input").
REASON_MAX_CHARS = 3000


def feedback_block(good: str, bad: str) -> dict[str, Any]:
    """Thumbs up and down under an answer: Slack's own feedback buttons (a ``context_actions``
    block), whose button values are ``good`` and ``bad`` (``core.feedback.feedback_id``)."""
    return {
        "type": "context_actions",
        "elements": [
            {
                "type": "feedback_buttons",
                "action_id": FEEDBACK_ACTION_ID,
                "positive_button": {
                    "text": {"type": "plain_text", "text": "👍"},
                    "accessibility_label": "Mark this answer as good",
                    "value": good,
                },
                "negative_button": {
                    "text": {"type": "plain_text", "text": "👎"},
                    "accessibility_label": "Mark this answer as bad",
                    "value": bad,
                },
            }
        ],
    }


def reason_view(metadata: str) -> dict[str, Any]:
    """The optional modal after a thumbs-down; ``metadata`` names the answer and its message."""
    return {
        "type": "modal",
        "callback_id": REASON_CALLBACK_ID,
        "private_metadata": metadata,
        "title": {"type": "plain_text", "text": "Thanks for the feedback"},
        "submit": {"type": "plain_text", "text": "Send"},
        "close": {"type": "plain_text", "text": "Skip"},
        "blocks": [
            {
                "type": "input",
                "block_id": REASON_BLOCK_ID,
                "optional": True,
                "label": {"type": "plain_text", "text": "What was wrong with the answer?"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_ACTION_ID,
                    "multiline": True,
                    "max_length": REASON_MAX_CHARS,
                },
            }
        ],
    }


def neutralise_mentions(markdown: str) -> str:
    """``markdown`` with every mention token that would notify someone written as plain words.

    Idempotent, and chunk-safe wherever no token is cut: the rewrite of a token depends on the
    token alone. Repeated until nothing matches, so a label cannot smuggle a token back in.
    """
    while True:
        quiet = _PING.sub(_quiet_mention, markdown)
        if quiet == markdown:
            return quiet
        markdown = quiet


def _quiet_mention(match: re.Match[str]) -> str:
    label = (match.group("label") or "").lstrip("@").strip()
    name = label or match.group("special") or match.group("team") or match.group("user") or ""
    return "@" + WORD_JOINER + name


def fallback_text(markdown: str, limit: int = FALLBACK_CHARS) -> str:
    """The plain mrkdwn ``text`` a notification shows for a Markdown answer."""
    text = markdown.replace("```", "")
    text = _MD_LINK.sub(r"\1 (\2)", text)
    text = _MD_EMPHASIS.sub(r"\2", text)
    text = _MD_HEADING.sub("", text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return escape(text)


def escape(text: str) -> str:
    """Escape the three characters mrkdwn treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def strip_mention(text: str, bot_user_id: str) -> str:
    """``text`` without the mentions of the bot (``<@U123>`` or ``<@U123|name>``)."""
    return re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", " ", text).strip()


def mentions(text: str, user_id: str) -> bool:
    """Whether ``text`` mentions ``user_id``."""
    return any(m.group(1) == user_id for m in _MENTION.finditer(text))


def to_plain(text: str) -> str:
    """Slack's incoming mrkdwn as the person typed it: links, mentions, channels, escapes."""

    def link(m: re.Match[str]) -> str:
        url, label = m.group(1), m.group(2)
        bare = url.removeprefix("mailto:").removeprefix("tel:")
        return bare if not label or label in (url, bare) else f"{label} ({url})"

    text = _LINK.sub(link, text)
    text = _MENTION.sub(lambda m: "@" + (m.group(2) or m.group(1)), text)
    text = _CHANNEL.sub(lambda m: "#" + (m.group(2) or m.group(1)), text)
    text = _SPECIAL.sub(lambda m: "@" + (m.group(2) or m.group(1)).lstrip("@"), text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
