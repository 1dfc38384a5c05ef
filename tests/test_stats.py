"""The paired comparison of two methods (harness.stats) on hand-built outcomes with known answers."""

from __future__ import annotations

from math import comb

import pytest

from harness.stats import mcnemar_exact, paired_compare, paired_difference_ci


def two_sided_binomial(k: int, n: int) -> float:
    """By hand: twice the smaller tail of Binomial(n, 1/2), capped at 1."""
    tail = sum(comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("only_a, only_b, expected", [
    (2, 8, 2 * (1 + 10 + 45) / 1024),  # 0.109375
    (0, 5, 2 / 32),
    (5, 0, 2 / 32),
    (1, 6, 2 * (1 + 7) / 128),  # 0.125
    (3, 3, 1.0),
    (0, 0, 1.0),  # no discordant problem: no evidence of a difference
])
def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs(only_a, only_b, expected):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, abs=1e-12)
    if only_a + only_b:
        assert mcnemar_exact(only_a, only_b) == pytest.approx(two_sided_binomial(only_a, only_a + only_b))


def test_paired_comparison_on_hand_built_outcomes():
    # 20 problems: both right on 10, only A on 1, only B on 6, neither on 3.
    a, b = {}, {}
    for i in range(20):
        pid = f"p{i}"
        a[pid], b[pid] = (True, True) if i < 10 else (True, False) if i < 11 else (False, True) if i < 17 else (False, False)
    pc = paired_compare(a, b)
    assert (pc.n, pc.only_a, pc.only_b) == (20, 1, 6)
    assert pc.accuracy_a == pytest.approx(11 / 20) and pc.accuracy_b == pytest.approx(16 / 20)
    assert pc.difference == pytest.approx(-5 / 20)
    assert pc.p_value == pytest.approx(0.125)
    # Agresti-Min by hand: cells + 1/2, n* = 22, d* = (1.5 - 6.5) / 22, var = (8/22 - d*^2) / 22.
    d = -5 / 22
    half = 1.959964 * ((8 / 22 - d * d) / 22) ** 0.5
    assert (pc.ci_low, pc.ci_high) == (pytest.approx(d - half, abs=1e-5), pytest.approx(d + half, abs=1e-5))
    assert pc.ci_low < pc.difference < pc.ci_high


def test_outcomes_are_matched_by_problem_id_not_position():
    a = {"x": True, "y": False, "z": True, "only-in-a": True}
    b = {"z": True, "y": True, "x": True, "only-in-b": False}  # other order, one id each not shared
    pc = paired_compare(a, b)
    assert pc.n == 3 and (pc.only_a, pc.only_b) == (0, 1)
    assert paired_compare({"a": True}, {"b": True}) is None


def test_identical_methods_differ_by_zero_with_an_honest_interval():
    outcomes = {f"p{i}": i % 3 == 0 for i in range(30)}
    pc = paired_compare(outcomes, dict(outcomes))
    assert pc.difference == 0 and pc.p_value == 1.0
    assert pc.ci_low < 0 < pc.ci_high  # not collapsed to a point, as a plain Wald interval would be


def test_interval_stays_within_minus_one_to_one():
    lo, hi = paired_difference_ci(0, 10, 0, 0)
    assert -1 <= lo < hi <= 1 and lo > 0
