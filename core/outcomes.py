"""What a user reads about how a turn ended: failures in plain words, and the notes on a reply.

The provider's own error text (an SDK's "peer closed connection without sending complete message
body", an API's JSON message) goes to the log for the operator; the user reads what happened and
what to do. Errors an operator must fix name the setting, as the log line does.
"""

from __future__ import annotations

import re

from core.errors import (
    ContextOverflowError,
    PermanentProviderError,
    ProviderAuthError,
    ProviderError,
    TransientProviderError,
)

#: Shown while a message waits for the answer before it in the same conversation.
WAITING_NOTICE = "_Waiting for the answer above to finish\u2026_"
#: Added after an answer that was shown but could not be stored.
UNSAVED_ANSWER_NOTE = "_I couldn't save this answer, so I won't remember it in this conversation._"
#: The reply when the question itself could not be stored (so it cannot be answered in context).
UNSAVED_QUESTION = (
    "I couldn't save your message (the bot's database is not answering), so I can't answer it "
    "now. Please try again in a minute."
)
UNEXPECTED_FAILURE = "Something went wrong on my side while answering. Please try again."
EMPTY_ANSWER = "The model returned an empty answer. Try rephrasing your question."

# Our providers word their transport failures (core/providers/failures.py); the phrases that
# tell the causes apart, checked in order. A status, when there is one, decides first.
_CAUSES = (
    ("did not answer within", "it took too long to answer"),
    ("cannot connect", "I can't connect to it"),
    ("dropped before the answer", "the connection to the model broke off"),
    ("malformed stream", "the connection to the model broke off"),
    ("mid-answer", "the model's service failed in the middle of the answer"),
)
#: A setting named in a provider's message, for errors only an operator can fix.
_BASE_URL_SETTING = re.compile(r"\b[A-Z][A-Z0-9]*_BASE_URL\b")
_RATE_LIMITED = 429
_OVERLOADED = (503, 529)
_TIMED_OUT = 408
_NOT_FOUND = 404


def plain_reason(error: TransientProviderError) -> str:
    """Why the model is not answering, in words a user understands (no SDK jargon)."""
    if error.status == _RATE_LIMITED:
        return "it is rate-limiting us"
    if error.status in _OVERLOADED:
        return "it is overloaded"
    if error.status == _TIMED_OUT:
        return "it took too long to answer"
    if error.status is not None and error.status >= 500:
        return f"it answered with a server error {error.status}"
    said = str(error).lower()
    for phrase, reason in _CAUSES:
        if phrase in said:
            return reason
    return "the connection to the model keeps failing"


def transient_failure(error: TransientProviderError, attempts: int) -> str:
    """The reply when every attempt failed."""
    reason = plain_reason(error)
    setting = _BASE_URL_SETTING.search(str(error))
    if setting is not None and "cannot connect" in str(error).lower():
        return (
            f"I can't reach the language model ({reason}). "
            f"An administrator needs to check the {setting.group(0)} setting and that the server "
            "is running."
        )
    return (
        f"The language model is not answering right now: {reason}. I tried {attempts} times; "
        "please try again in a minute."
    )


def permanent_failure(error: PermanentProviderError) -> str:
    """The reply when the provider refused the request for good (not a context overflow)."""
    if isinstance(error, ProviderAuthError):
        return (
            "I can't reach the language model: it refused the bot's credentials. "
            f"An administrator needs to check the {error.setting} setting."
        )
    if error.status == _NOT_FOUND:
        return (
            "The language model I'm set up to use isn't available. An administrator needs to "
            "check the LLM_MODEL setting."
        )
    if error.status == _RATE_LIMITED:
        return (
            "The language model account has run out of quota, so I can't answer for now. "
            "An administrator needs to check it."
        )
    return (
        "The language model refused to answer this request. Try rephrasing it; if it keeps "
        "happening, an administrator can find the reason in the bot's log."
    )


def failure_message(error: ProviderError, attempts: int, *, command_prefix: str = "/") -> str:
    """The plain-words reply for any provider failure (the error's text goes to the log)."""
    if isinstance(error, ContextOverflowError):
        return overflow_failure(error.limit, command_prefix=command_prefix)
    if isinstance(error, TransientProviderError):
        return transient_failure(error, attempts)
    assert isinstance(error, PermanentProviderError)
    return permanent_failure(error)


def overflow_failure(limit: int | None, *, command_prefix: str = "/", suggest: int = 0) -> str:
    """The reply when the conversation no longer fits the model, even cut to fit."""
    size = f" ({limit:,} tokens)" if limit else ""
    tokens = f" {suggest}" if suggest else ""
    return (
        f"This conversation no longer fits what the model can read at once{size}. "
        f"Start over with `{command_prefix}reset`, or let me keep a running summary of older "
        f"messages with `{command_prefix}history summary{tokens}` (or send only the newest that "
        f"fit with `{command_prefix}history tokens{tokens}`)."
    )


def cut_note(max_tokens: int, *, setting_limit: int, context_tokens: int | None) -> str:
    """The note after an answer cut at the reply limit."""
    if max_tokens >= setting_limit or context_tokens is None:
        limit = f"MAX_REPLY_TOKENS, {max_tokens:,} tokens"
    else:
        limit = (
            f"the room left in the model's {context_tokens:,}-token context, {max_tokens:,} tokens"
        )
    return f"_(cut here: the answer reached {limit}. Say \u201cgo on\u201d for more.)_"


#: Shown after an answer someone stopped (its text is kept as shown).
STOPPED_NOTE = "_Stopped._"
#: The one-line refusals of a regenerate (shown only to the person who asked).
REGENERATE_NOTHING = "There is no answer here to regenerate."
REGENERATE_ONLY_NEWEST = "Only the newest answer of a conversation can be regenerated."
REGENERATE_BUSY = (
    "An answer is still being written here: wait for it (or stop it), then regenerate."
)
REGENERATE_FAILED = (
    "I couldn't regenerate this answer: my database is not answering. Please try again in a minute."
)
