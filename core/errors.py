"""The error tree of threadbot.

Foreign exceptions (from the OpenAI and Anthropic SDKs, slack_sdk, discord.py, SQLAlchemy) are
translated into these at the boundary where they happen, raising ``ours from theirs``, so the
engine and the adapters only ever reason about this tree::

    ThreadbotError
    ├── ConfigError                   a setting is missing or wrong; names the variable to fix
    ├── ProviderError                 the language model could not answer
    │   ├── TransientProviderError    rate limit, 5xx, overload, timeout, dropped stream: retry
    │   └── PermanentProviderError    bad request, unknown model, ...: never retried
    │       ├── ProviderAuthError     the key is missing or refused: the operator must fix a setting
    │       └── ContextOverflowError  the request is longer than the model's context window
    ├── SurfaceError                  a platform call (post, edit) failed
    │   ├── SurfaceRateLimited        the platform answered 429; pause the scope for retry_after
    │   ├── TransientSurfaceError     5xx, timeout, connection reset: the call may be tried again
    │   └── PermanentSurfaceError     not allowed, message gone, ...: trying again will not help
    ├── StoreUnavailableError         the database cannot be reached right now: try again later
    ├── InputError                    the user's message cannot be answered as sent
    └── ExperimentError               an experiment command cannot be done as asked (operator)
"""

from __future__ import annotations


class ThreadbotError(Exception):
    """Base of every error threadbot raises on purpose."""


class ConfigError(ThreadbotError):
    """A setting is missing or invalid. The message names the environment variable to change."""

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class ProviderError(ThreadbotError):
    """The language model provider could not produce an answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientProviderError(ProviderError):
    """A failure worth retrying: rate limit, server error, overload, timeout, dropped stream.

    ``retry_after`` is the server's own advice in seconds when it gave one. ``reason`` says what
    failed when no HTTP status does (``timeout``, ``connection``), for the retry metrics.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after
        self.reason = reason


class PermanentProviderError(ProviderError):
    """A failure that retrying cannot fix: bad request, unknown model, content refused."""


class ProviderAuthError(PermanentProviderError):
    """The provider refused the credentials (or none were given). ``setting`` names the key."""

    def __init__(self, message: str, *, setting: str, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.setting = setting


class ImagesRefusedError(PermanentProviderError):
    """The model refused the request because it carried images (it cannot see them); the same
    request without the images may be answered.

    A real llama.cpp ``llama-server`` without a vision projector answers HTTP 500 "image input
    is not supported"; OpenAI answers 400 for a model without vision. Neither is worth retrying
    as it is.
    """


class ContextOverflowError(PermanentProviderError):
    """The request does not fit the model's context window; the same request never will.

    ``limit`` is the context size the server stated (tokens) and ``requested`` what the request
    came to, each ``None`` when the server did not say. Sending fewer or shorter messages (or a
    smaller ``max_tokens``) is the cure, not retrying.
    """

    def __init__(
        self,
        message: str,
        *,
        limit: int | None = None,
        requested: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.limit = limit
        self.requested = requested


class SurfaceError(ThreadbotError):
    """A platform call made to show a reply failed."""


class SurfaceRateLimited(SurfaceError):
    """The platform answered 429. The whole rate-limit scope waits ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float, scope: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.scope = scope


class TransientSurfaceError(SurfaceError):
    """A platform call failed in a way that may succeed when tried again (5xx, timeout)."""


class PermanentSurfaceError(SurfaceError):
    """A platform call failed for good: not allowed, message deleted, invalid arguments."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class InputError(ThreadbotError):
    """The user's message cannot be answered as sent; the message is shown to the user."""


class StoreUnavailableError(ThreadbotError):
    """The database could not be reached (connection refused or lost, timeout): a blip the
    caller may wait out, answering 503 where the platform redelivers."""


class ExperimentError(ThreadbotError):
    """An experiment cannot be started, stopped or shipped as asked; the message says why."""
