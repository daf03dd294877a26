"""``threadbot experiment start|list|stop|report``: compare system prompts on real conversations.

See ``core.experiments`` for how conversations are assigned and ``core.experiment_report`` for
what the report computes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from bots.experiment_page import render_page
from core import experiments
from core.config import Settings
from core.errors import ConfigError, ExperimentError
from core.experiment_report import ExperimentReport, VariantReport, build_report
from core.logs import configure_logging, report_failure, show_tracebacks
from core.store import ConversationStore, Experiment

PROG = "threadbot experiment"
#: Exit status of a mistyped command or one that cannot be done (as argparse uses).
EXIT_USAGE = 2
PERCENT = 100


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``threadbot experiment: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Compare system prompts on real conversations.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start an experiment")
    start.add_argument("name")
    start.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PROMPT",
        help="a variant and its system prompt (twice or more)",
    )
    start.add_argument("--weights", help="relative shares of new conversations, e.g. 50,50")
    start.add_argument(
        "--channel",
        action="append",
        default=[],
        metavar="ID",
        help="run only in this channel (any platform or workspace; repeatable); "
        "default: the whole deployment",
    )
    sub.add_parser("list", help="the experiments and their status")
    stop = sub.add_parser("stop", help="stop an experiment, optionally shipping a variant")
    stop.add_argument("name")
    stop.add_argument("--ship", metavar="VARIANT", help="make this variant's prompt the default")
    report = sub.add_parser("report", help="rates, intervals and a verdict")
    report.add_argument("name")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--html", type=Path, metavar="FILE", help="also write an HTML page")
    return parser


async def _start(store: ConversationStore, args: argparse.Namespace) -> str:
    variants = experiments.parse_variants(args.variant, args.weights)
    experiment = await experiments.start(store, args.name, variants, args.channel)
    return f"started {experiment.name} ({_scope(experiment)}): {_shares(experiment)}"


async def _list(store: ConversationStore, _args: argparse.Namespace) -> str:
    rows = await store.experiments()
    if not rows:
        return "no experiments yet"
    lines = []
    for e in rows:
        status = e.status + (f", shipped {e.shipped}" if e.shipped else "")
        started = e.created_at.strftime("%Y-%m-%d %H:%M")
        lines.append(f"{e.name}  {status}  {_scope(e)}  {_shares(e)}  started {started} UTC")
    return "\n".join(lines)


async def _stop(store: ConversationStore, args: argparse.Namespace) -> str:
    experiment, channels = await experiments.stop(store, args.name, args.ship)
    if args.ship is None:
        return f"stopped {experiment.name}; conversations go back to their usual prompt"
    where = (
        "the deployment's default prompt"
        if experiment.channels is None
        else f"the default prompt of {channels} channel(s) with id {', '.join(experiment.channels)}"
    )
    return f"stopped {experiment.name}; shipped {args.ship} as {where}"


async def _report(store: ConversationStore, args: argparse.Namespace) -> str:
    experiment = await experiments.find(store, args.name)
    report = build_report(
        experiment,
        await store.assignment_counts(experiment.id),
        await store.experiment_replies(experiment.id),
    )
    if args.html is not None:
        args.html.write_text(render_page(report), encoding="utf-8")
    return as_json(report) if args.json else as_text(report)


def as_json(report: ExperimentReport) -> str:
    """The report as the JSON object the README documents."""
    difference = report.difference
    document: dict[str, Any] = {
        "experiment": report.experiment,
        "status": report.status,
        "excluded": report.excluded,
        "variants": [
            {
                "name": v.name,
                "conversations": v.conversations,
                "replies": v.replies,
                "rated": v.rated,
                "positive": v.positive,
                "rate": v.rate,
                "ci_low": v.ci_low,
                "ci_high": v.ci_high,
                "ttft_p50": v.ttft_p50,
                "ttft_p95": v.ttft_p95,
                "errors": v.errors,
            }
            for v in report.variants
        ],
        "difference": {
            "from": difference.from_variant,
            "to": difference.to_variant,
            "estimate": difference.estimate,
            "ci_low": difference.ci_low,
            "ci_high": difference.ci_high,
        },
        "srm_p": report.srm_p,
        "verdict": report.verdict,
    }
    return json.dumps(document, indent=2)


def as_text(report: ExperimentReport) -> str:
    """The report for a terminal."""
    scope = "whole deployment" if report.scope is None else "channels " + ", ".join(report.scope)
    lines = [f"experiment {report.experiment} ({report.status}, {scope})", ""]
    header = (
        "variant", "convs", "replies", "rated", "thumbs up (95% CI)", "ttft p50/p95 ms",
        "errors", "mean tokens in/out",
    )  # fmt: skip
    rows = [header] + [_cells(v) for v in report.variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines.append(f"excluded conversations (their own prompt): {report.excluded}")
    d = report.difference
    if d.estimate is None or d.ci_low is None or d.ci_high is None:
        lines.append(f"difference {d.to_variant} - {d.from_variant}: no ratings to compare yet")
    else:
        lines.append(
            f"difference {d.to_variant} - {d.from_variant}: {_signed(d.estimate)} points "
            f"(95% CI {_signed(d.ci_low)} to {_signed(d.ci_high)}, bootstrap over conversations)"
        )
    lines.append(f"sample ratio check: p = {report.srm_p:.3g}")
    lines.append(f"verdict: {report.verdict}")
    return "\n".join(lines)


def _cells(v: VariantReport) -> tuple[str, ...]:
    rate = "-" if v.rate is None else f"{v.rate * PERCENT:.0f}%"
    ttft = "-" if v.ttft_p50 is None else f"{v.ttft_p50:.0f} / {v.ttft_p95:.0f}"
    error_rate = f"{v.errors / v.replies * PERCENT:.0f}%" if v.replies else "-"
    tokens = (
        "-"
        if v.mean_input_tokens is None
        else f"{v.mean_input_tokens:.0f} / {v.mean_output_tokens or 0:.0f}"
    )
    return (
        v.name,
        str(v.conversations),
        str(v.replies),
        str(v.rated),
        f"{rate} ({v.ci_low * PERCENT:.0f}-{v.ci_high * PERCENT:.0f}%)",
        ttft,
        f"{v.errors} ({error_rate})",
        tokens,
    )


def _scope(experiment: Experiment) -> str:
    if experiment.channels is None:
        return "whole deployment"
    return "channels " + ", ".join(experiment.channels)


def _shares(experiment: Experiment) -> str:
    total = sum(v.weight for v in experiment.variants)
    return ", ".join(f"{v.name} {v.weight / total * PERCENT:.0f}%" for v in experiment.variants)


def _signed(share: float) -> str:
    return f"{share * PERCENT:+.0f}"


async def run(settings: Settings, args: argparse.Namespace) -> str:
    """Open the store, do the action, close it; what to print."""
    store = await ConversationStore.open(settings.database_url)
    try:
        actions: dict[str, Callable[[ConversationStore, argparse.Namespace], Awaitable[str]]] = {
            "start": _start,
            "list": _list,
            "stop": _stop,
            "report": _report,
        }
        return await actions[args.action](store, args)
    finally:
        await store.close()


def main(argv: list[str] | None = None, *, stdout: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = Settings.load()
        configure_logging(settings, verbose=args.verbose, default="WARNING")
        output = asyncio.run(run(settings, args))
    except ConfigError as error:
        tracebacks = settings is not None and show_tracebacks(settings, verbose=args.verbose)
        report_failure(PROG, error, with_traceback=tracebacks)
        return EXIT_USAGE
    except (ExperimentError, OSError) as error:
        sys.stderr.write(f"{PROG}: {error}\n")
        return EXIT_USAGE
    stdout.write(output + "\n")
    return 0
