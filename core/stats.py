"""The statistics of an experiment report, with the standard library only.

- ``wilson_interval``: a proportion's 95% interval that behaves at 0%, 100% and small counts
  (Wilson 1927; Newcombe 1998, method 3).
- ``bootstrap_difference``: the interval of a difference of two rates when ratings come in
  clusters (the replies of one conversation are correlated): conversations are resampled whole,
  with a seeded generator so a report reads the same every time.
- ``chi_square_sf`` and ``srm_p``: the sample-ratio-mismatch check, a chi-square goodness of fit
  of conversations per variant against the weights.
- ``percentile`` and ``ratings_needed`` for the rest of the report.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import NormalDist

#: The normal quantile of a two-sided 95% interval.
Z_95 = NormalDist().inv_cdf(0.975)
#: The normal quantile of 80% power (the chance of seeing a real difference of the planned size).
Z_POWER_80 = NormalDist().inv_cdf(0.80)
#: Resamples of the bootstrap: enough for stable 2.5% and 97.5% percentiles.
BOOTSTRAP_RESAMPLES = 2000
#: The bootstrap's seed, so a report on the same data prints the same interval.
BOOTSTRAP_SEED = 12
#: The regularized gamma function is summed until a term is this small (relative).
GAMMA_EPSILON = 1e-15
GAMMA_MAX_ITERATIONS = 10_000
#: Below this a continued fraction's denominator counts as zero (Lentz's method).
TINY = 1e-300

#: A conversation's ratings: (thumbs up, ratings).
Cluster = tuple[int, int]


def wilson_interval(positive: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of ``positive`` out of ``total``; (0, 1) when there is none."""
    if total <= 0:
        return 0.0, 1.0
    rate = positive / total
    z2 = z * z
    centre = (rate + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled_rate(clusters: Sequence[Cluster]) -> float | None:
    """Thumbs up over ratings across ``clusters``; None without ratings."""
    rated = sum(n for _, n in clusters)
    return sum(p for p, _ in clusters) / rated if rated else None


def bootstrap_difference(
    before: Sequence[Cluster],
    after: Sequence[Cluster],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """The 95% percentile interval of rate(after) - rate(before), resampling whole clusters.

    Each side is resampled separately (its conversations drawn with replacement), so the
    correlation of replies within a conversation widens the interval as it should. None when a
    side has no ratings.
    """
    before = [c for c in before if c[1] > 0]
    after = [c for c in after if c[1] > 0]
    if not before or not after:
        return None
    generator = random.Random(seed)
    differences = []
    for _ in range(resamples):
        low = pooled_rate(generator.choices(before, k=len(before)))
        high = pooled_rate(generator.choices(after, k=len(after)))
        # Every cluster has ratings, so neither rate is None.
        differences.append((high or 0.0) - (low or 0.0))
    differences.sort()
    return percentile(differences, 0.025), percentile(differences, 0.975)


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile of sorted ``values``, interpolated linearly between ranks."""
    if not values:
        raise ValueError("no values")
    rank = share * (len(values) - 1)
    below = math.floor(rank)
    above = min(below + 1, len(values) - 1)
    return values[below] + (values[above] - values[below]) * (rank - below)


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for a chi-square variable with ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError("dof must be at least 1")
    if statistic <= 0:
        return 1.0
    return _upper_regularized_gamma(dof / 2, statistic / 2)


def _upper_regularized_gamma(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a): a series below a + 1, a continued fraction above (NR 6.2)."""
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        shape = a
        for _ in range(GAMMA_MAX_ITERATIONS):
            shape += 1
            term *= x / shape
            total += term
            if abs(term) < abs(total) * GAMMA_EPSILON:
                break
        return max(0.0, 1 - total * math.exp(log_prefix))
    # Modified Lentz's method for the continued fraction of Γ(a, x).
    b = x + 1 - a
    c = 1 / TINY
    d = 1 / b
    fraction = d
    for i in range(1, GAMMA_MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = TINY if abs(d) < TINY else d
        c = b + an / c
        c = TINY if abs(c) < TINY else c
        d = 1 / d
        step = d * c
        fraction *= step
        if abs(step - 1) < GAMMA_EPSILON:
            break
    return min(1.0, fraction * math.exp(log_prefix))


def srm_p(observed: Sequence[int], weights: Sequence[float]) -> float:
    """The p-value of ``observed`` counts per variant under the ``weights`` (chi-square fit).

    A small value (under 0.001 by convention) means the split is not what the weights promise:
    assignment or logging is broken, and the rates cannot be trusted. 1.0 with no data.
    """
    if len(observed) != len(weights):
        raise ValueError("one weight per variant")
    total = sum(observed)
    if total == 0 or len(observed) < 2:
        return 1.0
    weight_sum = sum(weights)
    statistic = 0.0
    for count, weight in zip(observed, weights, strict=True):
        expected = total * weight / weight_sum
        statistic += (count - expected) ** 2 / expected
    return chi_square_sf(statistic, len(observed) - 1)


def ratings_needed(rate: float, difference: float) -> int:
    """Ratings (both variants together) to see a ``difference`` in a rate near ``rate``.

    The usual two-proportion figure at 95% confidence and 80% power, per variant
    ``(z_a + z_b)^2 * 2 p (1 - p) / d^2``, doubled for the two variants.
    """
    spread = max(rate * (1 - rate), 0.01)
    per_variant = (Z_95 + Z_POWER_80) ** 2 * 2 * spread / difference**2
    return 2 * math.ceil(per_variant)
