"""Intervals and paired tests against worked examples, computed by hand from the published formulas."""

import math

import pytest

from realign import stats


def test_wilson_interval_worked_examples():
    # 15 of 100 at z = 1.96: centre (0.15 + 1.96²/200)/(1 + 1.96²/100) = 0.162952,
    # half-width 1.96·√(0.15·0.85/100 + 1.96²/40000)/(1 + 1.96²/100) = 0.069883.
    low, high = stats.wilson_interval(15, 100)
    assert low == pytest.approx(0.093060, abs=1e-6) and high == pytest.approx(0.232836, abs=1e-6)
    # 0 of 10: the interval starts at 0 and ends at z²/(n + z²) = 3.8415/13.8415 = 0.277533.
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    # 10 of 10 mirrors it.
    low, high = stats.wilson_interval(10, 10)
    assert low == pytest.approx(1 - 0.277533, abs=1e-6) and high == 1.0
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 2)


def test_rate_metrics_are_in_percent_with_their_count():
    metrics = stats.rate_metrics("harmful_score", [True] * 15 + [False] * 85)
    assert metrics["harmful_score"] == pytest.approx(15.0)
    assert metrics["harmful_score_ci95_low"] == pytest.approx(9.3060, abs=1e-4)
    assert metrics["harmful_score_ci95_high"] == pytest.approx(23.2836, abs=1e-4)
    assert metrics["harmful_score_n"] == 100


def test_a_default_sized_evaluation_bounds_a_15_percent_score_within_7_points():
    from realign.config import EvalSettings

    n = EvalSettings().num_prompts
    low, high = stats.wilson_interval(round(0.15 * n), n)
    assert (high - low) / 2 <= 0.07


def test_mcnemar_exact_worked_examples():
    # b = 10, c = 2: 2 · (C(12,0) + C(12,1) + C(12,2)) / 2¹² = 2 · 79 / 4096.
    assert stats.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert stats.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    # b = 5, c = 4: 2 · P(X ≤ 4 | 9) = 2 · 256/512 = 1.
    assert stats.mcnemar_exact(5, 4) == 1.0
    # b = 6, c = 0: 2 / 2⁶.
    assert stats.mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(0, 0) == 1.0


def _pairs(a, b, c, d):
    """Verdict lists with a both-flagged, b first-only, c second-only, d neither."""
    first = [True] * a + [True] * b + [False] * c + [False] * d
    second = [True] * a + [False] * b + [True] * c + [False] * d
    return first, second


def test_paired_difference_worked_example():
    # a, b, c, d = 8, 5, 4, 43 (n = 60). Second's rate p1 = 12/60 = 0.2, first's p2 = 13/60, θ = −1/60.
    # Wilson (z = 1.959964, z²/n = 0.0640243): 12/60 → centre 0.2320122/1.0640243 = 0.218052, half-width
    # 1.959964·√(0.0026667 + 0.0002668)/1.0640243 = 0.099767 → (0.118285, 0.317819); 13/60 → (0.131230, 0.336200).
    # ad − bc = 344 − 20 = 324 > n/2, so C = 324 − 30 = 294; φ = 294/√(13·47·12·48) = 294/593.2419 = 0.495582.
    # lower: (p1 − l1)² − 2φ(p1 − l1)(u2 − p2) + (u2 − p2)² = 0.0066773 − 0.0096812 + 0.0142882 = 0.0112843,
    #   θ − √0.0112843 = −0.016667 − 0.106227 = −0.122894
    # upper: (u1 − p1)² − 2φ(u1 − p1)(p2 − l2) + (p2 − l2)² = 0.0138811 − 0.0099770 + 0.0072995 = 0.0112036,
    #   θ + √0.0112036 = −0.016667 + 0.105847 = 0.089180
    result = stats.paired_difference(*_pairs(8, 5, 4, 43))
    assert result.n == 60 and result.only_first == 5 and result.only_second == 4
    assert result.first_rate == pytest.approx(13 / 60) and result.second_rate == pytest.approx(12 / 60)
    assert result.difference == pytest.approx(-1 / 60)
    assert result.ci95_low == pytest.approx(-0.122894, abs=3e-6)
    assert result.ci95_high == pytest.approx(0.089180, abs=3e-6)
    assert result.p_value == 1.0 and not result.excludes_zero


def test_paired_difference_beyond_the_noise_and_identical_runs():
    # 40 prompts flip from harmful to safe, none the other way: the repair is beyond the noise.
    result = stats.paired_difference(*_pairs(10, 40, 0, 50))
    assert result.difference == pytest.approx(-0.4) and result.ci95_high < 0 and result.excludes_zero
    assert result.p_value == pytest.approx(2 / 2**40)
    same = stats.paired_difference([True, False, True], [True, False, True])
    assert same.difference == 0 and same.ci95_low <= 0 <= same.ci95_high and same.p_value == 1.0
    with pytest.raises(ValueError):
        stats.paired_difference([True], [True, False])


def test_mean_metrics_for_a_score_that_is_not_a_rate():
    metrics = stats.mean_metrics("alpaca_accuracy", [0.2, 0.4, 0.6])
    # mean 0.4, s = 0.2, half-width 1.959964 · 0.2/√3 = 0.226317
    assert metrics["alpaca_accuracy"] == pytest.approx(40.0)
    assert metrics["alpaca_accuracy_ci95_low"] == pytest.approx(100 * (0.4 - 0.226317), abs=1e-4)
    assert metrics["alpaca_accuracy_n"] == 3
