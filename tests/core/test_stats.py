"""The report's statistics against published and closed-form values."""

from __future__ import annotations

import math

import pytest

from core.stats import (
    bootstrap_difference,
    chi_square_sf,
    percentile,
    ratings_needed,
    srm_p,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("positive", "total", "low", "high"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
        # method 3 (Wilson score, no continuity correction).
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_bounds_match_newcombes_table(
    positive: int, total: int, low: float, high: float
) -> None:
    assert wilson_interval(positive, total) == pytest.approx((low, high), abs=5e-5)


def test_wilson_without_ratings_says_nothing_is_known() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize(
    ("statistic", "dof", "p"),
    [
        # The chi-square table's critical values (5% and 1%).
        (3.841458820694124, 1, 0.05),
        (6.6348966010212145, 1, 0.01),
        (5.991464547107979, 2, 0.05),
        (7.814727903251178, 3, 0.05),
        (18.307038053275146, 10, 0.05),
    ],
)
def test_chi_square_survival_matches_the_table(statistic: float, dof: int, p: float) -> None:
    assert chi_square_sf(statistic, dof) == pytest.approx(p, rel=1e-9)


@pytest.mark.parametrize("statistic", [0.01, 0.5, 1.0, 3.0, 12.0, 40.0, 90.0])
def test_chi_square_survival_matches_closed_forms(statistic: float) -> None:
    # dof 1: erfc(sqrt(x/2)); dof 2: exp(-x/2); dof 4: exp(-x/2) (1 + x/2).
    assert chi_square_sf(statistic, 1) == pytest.approx(math.erfc(math.sqrt(statistic / 2)))
    assert chi_square_sf(statistic, 2) == pytest.approx(math.exp(-statistic / 2))
    four = math.exp(-statistic / 2) * (1 + statistic / 2)
    assert chi_square_sf(statistic, 4) == pytest.approx(four)
    assert chi_square_sf(0.0, 3) == 1.0


def test_srm_p_of_a_fair_and_a_skewed_split() -> None:
    assert srm_p([500, 500], [1, 1]) == pytest.approx(1.0)
    # 550 vs 450 out of 1,000 at 50/50: chi-square 10 on 1 dof.
    assert srm_p([550, 450], [50, 50]) == pytest.approx(math.erfc(math.sqrt(5)))
    # Weights count: 200 vs 800 is what 20/80 promises.
    assert srm_p([200, 800], [20, 80]) == pytest.approx(1.0)
    assert srm_p([500, 500], [20, 80]) < 1e-12
    assert srm_p([0, 0], [1, 1]) == 1.0


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    before = [(1, 2), (0, 1), (2, 2), (0, 3), (1, 1)] * 4
    after = [(2, 2), (1, 1), (3, 3), (1, 2), (0, 1)] * 4
    first = bootstrap_difference(before, after, seed=7)
    assert first == bootstrap_difference(before, after, seed=7)
    assert first != bootstrap_difference(before, after, seed=8)
    assert first is not None
    estimate = 7 / 9 - 4 / 9
    assert first[0] < estimate < first[1]


def test_bootstrap_widens_when_replies_of_a_conversation_agree() -> None:
    # 20 conversations per side, each rating 10 replies all the same way: really 20 ratings,
    # not 200. The same ratings taken one by one give a much narrower (overconfident) interval.
    before = [(10, 10)] * 8 + [(0, 10)] * 12
    after = [(10, 10)] * 12 + [(0, 10)] * 8
    clustered = bootstrap_difference(before, after)
    one_by_one = bootstrap_difference(
        [(1, 1)] * 80 + [(0, 1)] * 120, [(1, 1)] * 120 + [(0, 1)] * 80
    )
    assert clustered is not None and one_by_one is not None
    assert clustered[0] < 0 < clustered[1]  # 40% vs 60% from 20 conversations: unclear
    assert one_by_one[0] > 0  # wrongly "clear" when correlation is ignored
    assert clustered[1] - clustered[0] > 2 * (one_by_one[1] - one_by_one[0])


def test_bootstrap_needs_ratings_on_both_sides() -> None:
    assert bootstrap_difference([(1, 1)], [(0, 0)]) is None


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([10.0, 20.0, 30.0, 40.0], 0.5) == 25.0
    assert percentile([10.0, 20.0, 30.0, 40.0], 0.95) == pytest.approx(38.5)
    assert percentile([5.0], 0.95) == 5.0


def test_ratings_needed_for_a_twenty_point_difference_near_half() -> None:
    # (1.96 + 0.8416)^2 * 2 * 0.25 / 0.2^2 = 98.1 per variant -> 99, doubled.
    assert ratings_needed(0.5, 0.2) == 198
