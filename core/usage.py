"""Usage, cost and limits: what each turn spent, what it cost, and who may ask more today.

A turn's usage is what its requests to the model used: the provider's reported tokens, else the
estimate of ``core.tokens`` (marked as estimated). Its cost comes from a price table: the list
prices below, under ``MODEL_PRICES``. Both are stored on the turn's record (``turns``), so the
limits read them back from the database and every worker agrees:

- ``USER_DAILY_TOKENS`` / ``CHANNEL_DAILY_TOKENS``: tokens a user or a channel may spend per UTC
  day; a question over the limit is told when it resets, and the model is not called.
- ``USER_MESSAGES_PER_MINUTE``: questions a user may ask per minute on a platform; the surplus is
  told how many seconds to wait. The terminal (one person waiting for each answer) has no rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from core.config import Settings
from core.conversation import ConversationKey, Usage
from core.store import ConversationStore, TurnUsage
from core.tokens import TokenCounter

# List prices in dollars per million tokens (input, output), as published by OpenAI and
# Anthropic as of 2026. They may change: MODEL_PRICES overrides them without a release.
GPT_4_1_MINI_PRICE = (0.40, 1.60)
CLAUDE_HAIKU_4_5_PRICE = (1.00, 5.00)
BUILT_IN_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4.1-mini": GPT_4_1_MINI_PRICE,
    "claude-haiku-4-5": CLAUDE_HAIKU_4_5_PRICE,
}
#: Prices are quoted per this many tokens.
TOKENS_PER_PRICE = 1_000_000
#: The provider that answers without a model (core/providers/offline.py): it costs nothing.
FREE_PROVIDER = "offline"
#: The window ``USER_MESSAGES_PER_MINUTE`` counts questions in.
RATE_WINDOW = timedelta(minutes=1)

#: ``turns.refused`` for each limit.
USER_DAILY = "user_daily"
CHANNEL_DAILY = "channel_daily"
RATE = "rate"


def price_for(settings: Settings, provider: str, model: str) -> tuple[float, float] | None:
    """Dollars per million (input, output) tokens of ``model``; None when no price is known.

    ``MODEL_PRICES`` comes first. A dated snapshot (``claude-haiku-4-5-20251001``) takes the
    price of the longest model name it starts with.
    """
    if provider == FREE_PROVIDER:
        return (0.0, 0.0)
    table = {**BUILT_IN_PRICES, **{name: (i, o) for name, i, o in settings.model_prices}}
    if model in table:
        return table[model]
    prefixes = [name for name in table if model.startswith(f"{name}-")]
    return table[max(prefixes, key=len)] if prefixes else None


def cost_usd(
    price: tuple[float, float] | None, input_tokens: int, output_tokens: int
) -> float | None:
    """What ``input_tokens`` and ``output_tokens`` cost at ``price`` (None: no price)."""
    if price is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / TOKENS_PER_PRICE


@dataclass(slots=True)
class Tally:
    """The tokens of one turn's requests, attempt by attempt (retries and overflow refits)."""

    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    called: bool = False

    def add(self, usage: Usage, *, sent_tokens: int, shown: str, counter: TokenCounter) -> None:
        """Count one attempt: what the provider reported, else our estimate of what it did.

        An attempt that reported nothing and produced no text (refused, rate-limited, dropped
        before answering) did no work a provider bills for: it counts nothing.
        """
        self.called = True
        reported_in, reported_out = usage.input_tokens, usage.output_tokens
        if reported_in is None and reported_out is None and not shown:
            return
        if reported_in is None or reported_out is None:
            self.estimated = True
        self.input_tokens += sent_tokens if reported_in is None else reported_in
        self.output_tokens += counter.count(shown) if reported_out is None else reported_out

    def usage(self, settings: Settings, provider: str, model: str) -> TurnUsage:
        """The turn's usage and its cost, to store."""
        cost = cost_usd(price_for(settings, provider, model), self.input_tokens, self.output_tokens)
        return TurnUsage(model, self.input_tokens, self.output_tokens, self.estimated, cost)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A question turned away by a limit: which one, and what the person reads."""

    limit: str
    message: str


class Limits:
    """The daily token limits and the message rate, read from the store (every worker's turns)."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store = store
        self._now = now

    async def refusal(
        self, key: ConversationKey, user_id: str, turn_id: int | None, *, paced: bool
    ) -> Refusal | None:
        """Why the question of ``user_id`` at ``key`` must not be answered now, or None.

        ``turn_id``: the question's own record (it and later ones are not counted against it);
        ``paced``: whether the message rate applies.
        """
        now = self._now()
        midnight = datetime.combine(now.date(), time(), tzinfo=UTC)
        user_limit = self.settings.user_daily_tokens
        if user_limit is not None:
            spent = await self.store.tokens_since(midnight, platform=key.platform, user_id=user_id)
            if spent >= user_limit:
                return Refusal(USER_DAILY, daily_message("You've", "your", user_limit, now))
        channel_limit = self.settings.channel_daily_tokens
        if channel_limit is not None:
            spent = await self.store.tokens_since(
                midnight, platform=key.platform, channel=(key.workspace, key.channel)
            )
            if spent >= channel_limit:
                message = daily_message("This channel has", "its", channel_limit, now)
                return Refusal(CHANNEL_DAILY, message)
        per_minute = self.settings.user_messages_per_minute
        if paced and per_minute > 0:
            times = await self.store.recent_turn_times(
                key.platform, user_id, now - RATE_WINDOW, before_id=turn_id
            )
            if len(times) >= per_minute:
                # Free again once enough of the window's questions have aged out of it.
                frees = times[len(times) - per_minute] + RATE_WINDOW
                wait = max(1, math.ceil((frees - now).total_seconds()))
                return Refusal(RATE, rate_message(per_minute, wait))
        return None


def daily_message(who: str, whose: str, limit: int, now: datetime) -> str:
    """What a question over a daily limit reads: the limit and when it resets."""
    reset = datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)
    return (
        f"{who} used {whose} {limit:,} tokens for today; the limit resets at 00:00 UTC "
        f"(in {_duration(reset - now)})."
    )


def rate_message(per_minute: int, wait: int) -> str:
    """What a question beyond the message rate reads."""
    unit = "second" if wait == 1 else "seconds"
    return (
        f"You're sending messages faster than I can answer ({per_minute} a minute). "
        f"Please wait {wait} {unit} and ask again."
    )


def _duration(left: timedelta) -> str:
    minutes = max(1, math.ceil(left.total_seconds() / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
