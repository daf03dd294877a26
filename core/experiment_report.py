"""What an experiment's replies and ratings say: per variant, the difference, and a verdict.

Ratings are the users' clicks: each user's latest click on a reply counts once (a reply in a
Slack thread may have several users' ratings; in the terminal and most DMs it has one). The
thumbs-up share of a variant gets a Wilson interval; the difference between two variants gets a
bootstrap interval over conversations, because the replies of one conversation are rated by
the same person about the same subject and move together. The sample-ratio check compares
conversations per variant with the weights. The verdict waits for the planned number of
ratings (enough to see a ``MIN_DETECTABLE_DIFFERENCE`` most of the time), so it does not flip
back and forth while ratings trickle in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean

from core.stats import (
    Cluster,
    bootstrap_difference,
    percentile,
    pooled_rate,
    ratings_needed,
    srm_p,
    wilson_interval,
)
from core.store import AssignmentCounts, Experiment, ExperimentReply

#: The smallest difference in thumbs-up share the planned sample should reveal (20 points).
MIN_DETECTABLE_DIFFERENCE = 0.20
#: The rate assumed for planning before any rating came in (the most demanding one).
PLANNING_RATE = 0.5
#: Below this sample-ratio p-value the split is broken (the usual SRM threshold).
SRM_ALPHA = 0.001
#: The planned number of ratings is shown rounded to this ("about 200").
ROUND_NEEDED_TO = 10
PERCENT = 100


@dataclass(frozen=True, slots=True)
class VariantReport:
    """One variant's figures; rates are fractions, ``rate`` None without ratings."""

    name: str
    weight: float
    conversations: int
    replies: int
    rated: int
    positive: int
    rate: float | None
    ci_low: float
    ci_high: float
    ttft_p50: float | None
    ttft_p95: float | None
    errors: int
    mean_input_tokens: float | None
    mean_output_tokens: float | None


@dataclass(frozen=True, slots=True)
class Difference:
    """rate(to) - rate(from), absolute, with its 95% interval (None: a side has no ratings)."""

    from_variant: str
    to_variant: str
    estimate: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True, slots=True)
class ExperimentReport:
    experiment: str
    status: str
    scope: tuple[str, ...] | None
    excluded: int
    variants: tuple[VariantReport, ...]
    difference: Difference
    srm_p: float
    verdict: str


def build_report(
    experiment: Experiment, counts: AssignmentCounts, replies: Sequence[ExperimentReply]
) -> ExperimentReport:
    """The report of ``experiment`` from its assignments and its replies."""
    by_variant: dict[str, list[ExperimentReply]] = defaultdict(list)
    for reply in replies:
        by_variant[reply.variant].append(reply)
    variants = tuple(
        _variant(v.name, v.weight, counts.per_variant.get(v.name, 0), by_variant[v.name])
        for v in experiment.variants
    )
    clusters = {v.name: _clusters(by_variant[v.name]) for v in experiment.variants}
    difference = _difference(variants, clusters)
    srm = srm_p([v.conversations for v in variants], [v.weight for v in variants])
    return ExperimentReport(
        experiment=experiment.name,
        status=experiment.status,
        scope=experiment.channels,
        excluded=counts.excluded,
        variants=variants,
        difference=difference,
        srm_p=srm,
        verdict=verdict(variants, difference, srm),
    )


def _variant(
    name: str, weight: float, conversations: int, replies: Sequence[ExperimentReply]
) -> VariantReport:
    rated = sum(r.rated for r in replies)
    positive = sum(r.positive for r in replies)
    low, high = wilson_interval(positive, rated)
    ttfts = sorted(float(r.first_token_ms) for r in replies if r.first_token_ms is not None)
    inputs = [r.input_tokens for r in replies if r.input_tokens is not None]
    outputs = [r.output_tokens for r in replies if r.output_tokens is not None]
    return VariantReport(
        name=name,
        weight=weight,
        conversations=conversations,
        replies=len(replies),
        rated=rated,
        positive=positive,
        rate=positive / rated if rated else None,
        ci_low=low,
        ci_high=high,
        ttft_p50=percentile(ttfts, 0.5) if ttfts else None,
        ttft_p95=percentile(ttfts, 0.95) if ttfts else None,
        errors=sum(r.failed for r in replies),
        mean_input_tokens=fmean(inputs) if inputs else None,
        mean_output_tokens=fmean(outputs) if outputs else None,
    )


def _clusters(replies: Sequence[ExperimentReply]) -> list[Cluster]:
    """(thumbs up, ratings) per conversation."""
    totals: dict[int, tuple[int, int]] = {}
    for reply in replies:
        positive, rated = totals.get(reply.conversation_id, (0, 0))
        totals[reply.conversation_id] = (positive + reply.positive, rated + reply.rated)
    return list(totals.values())


def compared(variants: Sequence[VariantReport]) -> tuple[VariantReport, VariantReport]:
    """The pair the difference is about: the first variant and the best of the others."""
    first, *others = variants
    rated = [v for v in others if v.rate is not None]
    best = max(rated, key=lambda v: v.rate or 0.0) if rated else others[0]
    return first, best


def _difference(
    variants: Sequence[VariantReport], clusters: dict[str, list[Cluster]]
) -> Difference:
    before, after = compared(variants)
    if before.rate is None or after.rate is None:
        return Difference(before.name, after.name, None, None, None)
    interval = bootstrap_difference(clusters[before.name], clusters[after.name])
    estimate = (pooled_rate(clusters[after.name]) or 0.0) - (
        pooled_rate(clusters[before.name]) or 0.0
    )
    low, high = interval if interval is not None else (None, None)
    return Difference(before.name, after.name, estimate, low, high)


def verdict(variants: Sequence[VariantReport], difference: Difference, srm: float) -> str:
    """One line in plain words: what to do with this experiment now."""
    if srm < SRM_ALPHA:
        return (
            f"sample ratio mismatch (p = {srm:.2g}): conversations per variant do not follow "
            "the weights; find the cause before trusting the rates"
        )
    pair = [v for v in variants if v.name in (difference.from_variant, difference.to_variant)]
    rated = sum(v.rated for v in pair)
    observed = pooled_rate([(v.positive, v.rated) for v in pair])
    needed = ratings_needed(
        PLANNING_RATE if observed is None else observed, MIN_DETECTABLE_DIFFERENCE
    )
    low, high = difference.ci_low, difference.ci_high
    if rated < needed or low is None or high is None:
        about = max(ROUND_NEEDED_TO, round(needed / ROUND_NEEDED_TO) * ROUND_NEEDED_TO)
        return f"not enough ratings yet: {rated} of about {about} needed"
    if low > 0:
        return f"{difference.to_variant} is better by {_points(low)} to {_points(high)} points"
    if high < 0:
        return f"{difference.from_variant} is better by {_points(-high)} to {_points(-low)} points"
    return (
        f"no clear difference: {difference.to_variant} is between {_points(-low)} points worse "
        f"and {_points(high)} points better than {difference.from_variant}"
    )


def _points(share: float) -> int:
    return round(share * PERCENT)
