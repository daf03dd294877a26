"""``threadbot usage``: turns, tokens and cost per user, channel, model or day."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO, cast

from core.config import Settings
from core.errors import ConfigError
from core.logs import configure_logging, report_failure, show_tracebacks
from core.store import ConversationStore, UsageGroup, UsageGrouping

#: Exit status when an operator must fix a setting.
EXIT_CONFIG = 2
GROUPINGS = ("day", "user", "channel", "model")
#: ``--since``: a count and a unit (days, hours, weeks).
SINCE_PATTERN = re.compile(r"^(\d+)([hdw])$")
SINCE_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
HEADERS = ("turns", "input tokens", "output tokens", "cost")


def parse_since(text: str) -> timedelta:
    """``--since``'s value (``7d``, ``12h``, ``2w``) as a span of time."""
    match = SINCE_PATTERN.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not Nh, Nd or Nw (e.g. 7d)")
    return int(match.group(1)) * SINCE_UNITS[match.group(2)]


def as_json(groups: Sequence[UsageGroup], by: str) -> str:
    """One object per group: ``{"<by>": key, "turns", "input_tokens", "output_tokens", "cost"}``."""
    rows = [
        {
            by: g.key,
            "turns": g.turns,
            "input_tokens": g.input_tokens,
            "output_tokens": g.output_tokens,
            "cost": None if g.cost is None else round(g.cost, 6),
        }
        for g in groups
    ]
    return json.dumps(rows, indent=2)


def as_table(groups: Sequence[UsageGroup], by: str) -> str:
    """A plain-text table with a total line."""
    total = UsageGroup(
        "total",
        sum(g.turns for g in groups),
        sum(g.input_tokens for g in groups),
        sum(g.output_tokens for g in groups),
        _total_cost(groups),
    )
    lines = [(by, *HEADERS)] + [_cells(g) for g in groups]
    widths = [max(len(line[i]) for line in [*lines, _cells(total)]) for i in range(5)]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    body = [render(line) for line in lines]
    return "\n".join([body[0], rule, *body[1:], rule, render(_cells(total))])


def _cells(group: UsageGroup) -> tuple[str, str, str, str, str]:
    cost = "n/a" if group.cost is None else f"${group.cost:,.4f}"
    return (
        group.key,
        f"{group.turns:,}",
        f"{group.input_tokens:,}",
        f"{group.output_tokens:,}",
        cost,
    )


def _total_cost(groups: Sequence[UsageGroup]) -> float | None:
    costs = [g.cost for g in groups if g.cost is not None]
    return sum(costs) if costs else None


async def report(settings: Settings, since: timedelta, by: UsageGrouping) -> list[UsageGroup]:
    """The usage since ``since`` ago, grouped ``by``."""
    store = await ConversationStore.open(settings.database_url)
    try:
        return await store.usage_report(datetime.now(UTC) - since, by)
    finally:
        await store.close()


def main(argv: list[str] | None = None, *, stdout: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="threadbot usage",
        description="Turns, tokens and cost per group, from the turns every worker recorded.",
    )
    parser.add_argument(
        "--since", type=parse_since, default="7d", help="how far back: Nh, Nd or Nw (default 7d)"
    )
    parser.add_argument("--by", choices=GROUPINGS, default="day", help="group by (default day)")
    parser.add_argument("--json", action="store_true", help="a JSON list, one object per group")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show the traceback of a failure"
    )
    args = parser.parse_args(argv)
    settings: Settings | None = None
    try:
        settings = Settings.load()
        configure_logging(settings, verbose=args.verbose, default="WARNING")
        groups = asyncio.run(report(settings, args.since, cast(UsageGrouping, args.by)))
    except ConfigError as error:
        tracebacks = settings is not None and show_tracebacks(settings, verbose=args.verbose)
        report_failure("threadbot usage", error, with_traceback=tracebacks)
        return EXIT_CONFIG
    stdout.write((as_json(groups, args.by) if args.json else as_table(groups, args.by)) + "\n")
    return 0
