"""Paired-round statistics against hand-computed cases."""

import math

import numpy as np
import pytest

from infermatrix.reports.paired import (bh_adjust, ci_rank, detectable_change, paired_ratio, signed_rank_cdf,
                                        walsh_averages)


def test_signed_rank_distribution_of_three_rounds():
    # subsets of {1, 2, 3} by sum: 0:{} 1:{1} 2:{2} 3:{3},{1,2} 4:{1,3} 5:{2,3} 6:{1,2,3}
    assert signed_rank_cdf(3) == pytest.approx([1 / 8, 2 / 8, 3 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0])


def test_ci_rank_matches_the_signed_rank_tables():
    assert ci_rank(5, 0.05) == 0  # 2 / 32 > 0.05: no interval reaches 95%
    assert ci_rank(6, 0.05) == 1  # P(T <= 0) = 1/64 <= 0.025 < P(T <= 1) = 2/64
    assert ci_rank(8, 0.05) == 4  # P(T <= 3) = 5/256 <= 0.025 < P(T <= 4) = 7/256
    # past the exact range the normal approximation takes over; at n = 60 both agree
    mean, sd = 60 * 61 / 4, math.sqrt(60 * 61 * 121 / 24)
    assert abs(ci_rank(60, 0.05) - math.floor(mean + 0.5 - 1.959964 * sd)) <= 1
    assert ci_rank(61, 0.05) == math.floor(61 * 62 / 4 + 0.5 - 1.959964 * math.sqrt(61 * 62 * 123 / 24))


def test_walsh_averages_are_all_pairwise_means():
    assert walsh_averages(np.array([1.0, 3.0])).tolist() == [1.0, 2.0, 3.0]


def test_six_rounds_give_the_extreme_walsh_averages_and_exact_p():
    d = 0.01 * np.arange(1, 7)
    base = np.ones(6)
    result = paired_ratio(base, np.exp(d))
    assert result.n == 6
    assert result.ratio == pytest.approx(math.exp(0.035))  # symmetric: the centre of the d's
    assert result.ci_low == pytest.approx(math.exp(0.01))
    assert result.ci_high == pytest.approx(math.exp(0.06))
    assert result.p_value == pytest.approx(2 / 64)  # all six positive, exact two-sided
    assert result.half_width == pytest.approx(0.025)


def test_eight_rounds_use_the_fourth_walsh_average_from_each_end():
    d = 0.01 * np.arange(1, 9)  # Walsh averages from below: 1, 1.5, 2, 2, ...
    result = paired_ratio(np.full(8, 2.0), 2.0 * np.exp(d))
    assert result.ci_low == pytest.approx(math.exp(0.02))
    assert result.ci_high == pytest.approx(math.exp(0.07))
    assert result.ratio == pytest.approx(math.exp(0.045))


def test_too_few_rounds_have_no_interval():
    result = paired_ratio([1.0, 1.0, 1.0], [1.1, 1.2, 1.05])
    assert result.ci_low is None and math.isinf(result.half_width)


def test_identical_sides_are_no_change():
    result = paired_ratio([1.0] * 6, [1.0] * 6)
    assert result.ratio == 1.0 and result.p_value == 1.0


@pytest.mark.parametrize("base,new", [([1.0], [1.0, 2.0]), ([], []), ([0.0, 1.0], [1.0, 1.0]),
                                      ([1.0, math.nan], [1.0, 1.0])])
def test_bad_rounds_are_refused(base, new):
    with pytest.raises(ValueError):
        paired_ratio(base, new)


def test_benjamini_hochberg_by_hand():
    # sorted .01 .03 .04 .5 -> p * m / rank = .04 .06 .0533 .5, then the running minimum from the top
    q = bh_adjust([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert bh_adjust([]) == []


def test_detectable_change_scales_the_half_width():
    # z(0.975) = 1.96, z(0.8) = 0.8416: 1.4294 half-widths
    assert detectable_change(0.02) == pytest.approx(math.expm1(0.02 * 2.8016 / 1.96), rel=1e-3)
    assert math.isinf(detectable_change(math.inf))
