"""Who may use the bot, and where: one pure decision every platform's front door applies.

``AccessRules`` is read from ALLOWED_CHANNELS, ALLOWED_USERS, BLOCKED_USERS, ALLOW_DMS and
ADMIN_USERS. Each list holds platform ids (Slack ``C…``/``U…``, Discord snowflakes); an entry
may name its platform (``slack:U123``) where ids of two platforms could be confused. Unset lists
let everyone in, everywhere; a blocked user stays out even when also allowed.

What a refusal looks like is the front door's business (``core.bot``): messages outside the rules
get silence, a DM where DMs are off gets one polite refusal a day, a command gets a short answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from core.config import Settings

#: Why a message or command is turned away: ``user`` (blocked, or not in ALLOWED_USERS),
#: ``channel`` (not in ALLOWED_CHANNELS), ``dm`` (a direct message while ALLOW_DMS is off).
Refusal = Literal["user", "channel", "dm"]

#: What a DM gets, once a day per person, when ALLOW_DMS is off.
DM_REFUSAL = "I don't take direct messages here; ask me in a channel."
#: What a command of someone outside the rules gets (commands are ephemeral: no one else sees).
USER_REFUSAL = "Sorry, you can't use this bot."
#: What a command in a channel outside ALLOWED_CHANNELS gets.
CHANNEL_REFUSAL = "I'm not enabled in this channel."
#: A command's answer for each refusal.
COMMAND_REFUSALS: dict[Refusal, str] = {
    "user": USER_REFUSAL,
    "channel": CHANNEL_REFUSAL,
    "dm": DM_REFUSAL,
}


def _matches(entries: frozenset[str], platform: str, id_: str) -> bool:
    return id_ in entries or f"{platform}:{id_}" in entries


@dataclass(frozen=True, slots=True)
class AccessRules:
    """The deployment's access rules. ``None`` for an allow-list: not set, so no restriction."""

    allowed_channels: frozenset[str] | None = None
    allowed_users: frozenset[str] | None = None
    blocked_users: frozenset[str] = frozenset()
    allow_dms: bool = True
    admin_users: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessRules:
        """The rules the settings spell."""

        def allow_list(ids: tuple[str, ...] | None) -> frozenset[str] | None:
            return None if ids is None else frozenset(ids)

        return cls(
            allowed_channels=allow_list(settings.allowed_channels),
            allowed_users=allow_list(settings.allowed_users),
            blocked_users=frozenset(settings.blocked_users),
            allow_dms=settings.allow_dms,
            admin_users=frozenset(settings.admin_users),
        )

    def refusal(self, platform: str, channel: str, user: str, direct: bool) -> Refusal | None:
        """Why ``user`` may not use the bot in ``channel`` (a thread: its parent), or None.

        ALLOWED_CHANNELS does not apply to DMs: ALLOW_DMS does.
        """
        if _matches(self.blocked_users, platform, user):
            return "user"
        if self.allowed_users is not None and not _matches(self.allowed_users, platform, user):
            return "user"
        if direct:
            return None if self.allow_dms else "dm"
        if self.allowed_channels is not None and not _matches(
            self.allowed_channels, platform, channel
        ):
            return "channel"
        return None

    def allows(self, platform: str, channel: str, user: str, direct: bool) -> bool:
        """Whether ``user`` may use the bot in ``channel`` (``direct``: a DM)."""
        return self.refusal(platform, channel, user, direct) is None

    def is_admin(self, platform: str, user: str) -> bool:
        """Whether ``user`` is in ADMIN_USERS (may change any channel's defaults)."""
        return _matches(self.admin_users, platform, user)


def dm_refusal_key(user: str, day: date) -> str:
    """The processed-event key that records ``user``'s DM refusal of ``day`` (one per day)."""
    return f"dm-refusal:{user}:{day.isoformat()}"
