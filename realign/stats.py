"""Intervals and paired tests for rates. Pure functions: no models, no MLflow.

- `wilson_interval`: the Wilson score interval of a binomial proportion (Wilson 1927), the interval every rate
  realign logs carries (`<metric>_ci95_low`, `<metric>_ci95_high`, with `<metric>_n`).
- `paired_difference`: two models judged on the same prompts. The difference of their rates with Newcombe's
  hybrid score interval for paired proportions (Newcombe 1998, "Improved confidence intervals for the difference
  between binomial proportions based on paired data", method 10), and McNemar's exact test on the discordant
  pairs (two-sided binomial test of b against b + c at 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for successes / n, as proportions in [0, 1]; NaNs when n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); the formula only reaches it up to rounding.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate_metrics(name: str, hits: Sequence[bool], scale: float = 100.0) -> dict[str, float]:
    """`name` = scale · (hits / n) with its Wilson interval and count, as realign logs every rate."""
    n = len(hits)
    k = sum(bool(hit) for hit in hits)
    low, high = wilson_interval(k, n)
    return {name: scale * k / n if n else float("nan"), f"{name}_ci95_low": scale * low,
            f"{name}_ci95_high": scale * high, f"{name}_n": float(n)}


def mean_metrics(name: str, values: Sequence[float], scale: float = 100.0) -> dict[str, float]:
    """`name` = scale · mean(values) for scores in [0, 1] that are not yes/no (ROUGE-L), with the normal
    interval mean ± z·s/√n clipped to [0, 1] (no Wilson interval exists for a mean score), and the count."""
    n = len(values)
    if n == 0:
        nan = float("nan")
        return {name: nan, f"{name}_ci95_low": nan, f"{name}_ci95_high": nan, f"{name}_n": 0.0}
    mean = sum(values) / n
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = Z95 * spread / math.sqrt(n)
    return {name: scale * mean, f"{name}_ci95_low": scale * max(0.0, mean - half),
            f"{name}_ci95_high": scale * min(1.0, mean + half), f"{name}_n": float(n)}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: 2 · P(X ≤ min(b, c)), X ~ Bin(b + c, 1/2),
    capped at 1; 1 when there are no discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """Rate of `second` minus rate of `first` over the same n items, as proportions."""

    n: int
    first_rate: float
    second_rate: float
    difference: float
    ci95_low: float
    ci95_high: float
    only_first: int  # b: items flagged for the first only
    only_second: int  # c: items flagged for the second only
    p_value: float  # McNemar's exact test

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0: a difference beyond the noise."""
        return self.ci95_low > 0 or self.ci95_high < 0


def paired_difference(first: Sequence[bool], second: Sequence[bool], z: float = Z95) -> PairedDifference:
    """second − first for two verdict lists over the same items, with Newcombe's method-10 interval.

    With a = both, b = first only, c = second only, d = neither, n = a + b + c + d: p1 = (a + c)/n is the second's
    rate, p2 = (a + b)/n the first's, θ = p1 − p2 = (c − b)/n. (l_i, u_i) are the Wilson limits of p_i and
    φ = C/√((a+b)(c+d)(a+c)(b+d)) with Newcombe's continuity-corrected C = ad − bc − n/2 when ad − bc > n/2,
    ad − bc when it is negative, else 0 (and φ = 0 when a margin is empty), as in Altman et al., Statistics with
    Confidence (2000), p. 52. Then
    θ − √((p1 − l1)² − 2φ(p1 − l1)(u2 − p2) + (u2 − p2)²) ≤ θ ≤ θ + √((u1 − p1)² − 2φ(u1 − p1)(p2 − l2) + (p2 − l2)²).
    """
    if len(first) != len(second):
        raise ValueError(f"paired verdicts need the same items: {len(first)} vs {len(second)}")
    n = len(first)
    if n == 0:
        nan = float("nan")
        return PairedDifference(0, nan, nan, nan, nan, nan, 0, 0, 1.0)
    a = sum(bool(x) and bool(y) for x, y in zip(first, second))
    b = sum(bool(x) and not bool(y) for x, y in zip(first, second))
    c = sum(not bool(x) and bool(y) for x, y in zip(first, second))
    d = n - a - b - c
    p1, p2 = (a + c) / n, (a + b) / n
    l1, u1 = wilson_interval(a + c, n, z)
    l2, u2 = wilson_interval(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    theta = p1 - p2
    lower_spread = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    upper_spread = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    low = max(-1.0, theta - math.sqrt(max(lower_spread, 0.0)))
    high = min(1.0, theta + math.sqrt(max(upper_spread, 0.0)))
    return PairedDifference(n, p2, p1, theta, low, high, b, c, mcnemar_exact(b, c))
