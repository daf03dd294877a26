"""The report's figures and verdicts from known replies and ratings."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.experiment_report import build_report
from core.store import AssignmentCounts, Experiment, ExperimentReply, ExperimentVariant

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def experiment(*names: str) -> Experiment:
    variants = tuple(ExperimentVariant(n, f"Prompt {n}.", 1) for n in names)
    return Experiment(1, "tone", "seed", variants, None, "running", None, NOW, None)


def replies(
    variant: str, ups: int, downs: int, *, per_conversation: int = 4
) -> list[ExperimentReply]:
    """Conversations of ``per_conversation`` replies: ``ups`` rate every reply up, ``downs``
    every reply down (replies of one conversation agree)."""
    made = []
    for index, value in enumerate([1] * ups + [0] * downs):
        conversation = sum(map(ord, variant)) * 1000 + index
        for reply in range(per_conversation):
            made.append(
                ExperimentReply(conversation, variant, False, 100 + reply * 10, 50, 20, 1, value)
            )
    return made


def counts(**per_variant: int) -> AssignmentCounts:
    return AssignmentCounts(per_variant, 3)


def test_a_planted_difference_is_found_with_its_clustered_interval() -> None:
    data = replies("concise", 40, 10) + replies("detailed", 20, 30)
    report = build_report(experiment("detailed", "concise"), counts(detailed=50, concise=50), data)
    _, concise = report.variants
    assert (concise.rated, concise.positive, concise.rate) == (200, 160, 0.8)
    assert concise.ci_low == pytest.approx(0.7391, abs=1e-4)  # Wilson, 160 of 200
    assert (
        concise.ttft_p50 == 115 and concise.ttft_p95 == 130
    )  # 50 replies each at 100, 110, 120, 130 ms
    d = report.difference
    assert (d.from_variant, d.to_variant) == ("detailed", "concise")
    assert d.estimate == pytest.approx(0.4)
    assert d.ci_low is not None and d.ci_high is not None
    assert 0.2 < d.ci_low < 0.4 < d.ci_high < 0.6
    assert (
        report.verdict
        == f"concise is better by {round(d.ci_low * 100)} to {round(d.ci_high * 100)} points"
    )
    assert report.excluded == 3 and report.srm_p == pytest.approx(1.0)


def test_few_ratings_say_how_many_are_needed() -> None:
    # Half of 12 up: planning at 50% for a 20-point difference needs 2 x 99 ratings.
    data = replies("a", 4, 2, per_conversation=1) + replies("b", 2, 4, per_conversation=1)
    report = build_report(experiment("a", "b"), counts(a=6, b=6), data)
    assert report.verdict == "not enough ratings yet: 12 of about 200 needed"


def test_overlapping_rates_are_no_clear_difference() -> None:
    data = replies("a", 26, 24) + replies("b", 25, 25)
    report = build_report(experiment("a", "b"), counts(a=50, b=50), data)
    assert report.verdict.startswith("no clear difference: b is between ")


def test_a_broken_split_is_called_out_first() -> None:
    data = replies("a", 40, 10) + replies("b", 20, 30)
    report = build_report(experiment("a", "b"), counts(a=900, b=600), data)
    assert report.srm_p < 0.001
    assert report.verdict.startswith("sample ratio mismatch")


def test_with_three_variants_the_best_is_compared_with_the_first() -> None:
    data = replies("a", 20, 30) + replies("b", 30, 20) + replies("c", 45, 5)
    report = build_report(experiment("a", "b", "c"), counts(a=50, b=50, c=50), data)
    assert (report.difference.from_variant, report.difference.to_variant) == ("a", "c")
