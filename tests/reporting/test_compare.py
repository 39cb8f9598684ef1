"""Intervals and verdicts of reporting.compare: exact coverage, paired coverage, verdict logic."""

import numpy as np
import pytest
from scipy import stats

from smoothtransfer.reporting.compare import (
    CONTRADICTED,
    REPRODUCED,
    UNRESOLVED,
    clopper_pearson,
    format_interval,
    paired_difference,
    verdict,
)


@pytest.mark.parametrize("n", [10, 57, 200])
def test_clopper_pearson_exact_coverage(n):
    # exact: for every p on a grid, the probability that the interval covers p is >= 95%
    ks = np.arange(n + 1)
    bounds = [clopper_pearson(int(k), n) for k in ks]
    for p in np.linspace(0.001, 0.999, 97):
        cover = sum(stats.binom.pmf(k, n, p) for k, (lo, hi) in zip(ks, bounds) if lo <= p <= hi)
        assert cover >= 0.95 - 1e-9, (n, p, cover)


def test_clopper_pearson_edges():
    assert clopper_pearson(0, 20)[0] == 0.0 and clopper_pearson(20, 20)[1] == 1.0
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    assert format_interval(5, 10) == "50.0 [18.7, 81.3]"


@pytest.mark.statistical
@pytest.mark.parametrize("n,probs", [
    (200, (0.5, 0.1, 0.1, 0.3)),     # both right, A only, B only, neither
    (200, (0.2, 0.25, 0.05, 0.5)),   # a large true difference
    (500, (0.6, 0.02, 0.03, 0.35)),  # few discordant pairs
])
def test_paired_interval_coverage(n, probs):
    # seeded simulation: 2000 paired samples; the interval must cover the true difference in >= 92.5% of
    # them (Newcombe's method 10 is near-nominal; at true coverage 0.95 the chance of < 0.925 is < 1e-6)
    rng = np.random.default_rng(0)
    true = probs[1] - probs[2]
    covered, widths = 0, []
    for _ in range(2000):
        cells = rng.choice(4, size=n, p=probs)
        a = (cells == 0) | (cells == 1)
        b = (cells == 0) | (cells == 2)
        d = paired_difference(a, b)
        covered += d.lo <= true <= d.hi
        widths.append(d.hi - d.lo)
    assert covered / 2000 >= 0.925
    # and it is not trivially wide: within 1.25x the width of the (large-sample) Wald interval
    wald = 2 * 1.96 * np.sqrt((probs[1] + probs[2] - true**2) / n)
    assert np.mean(widths) < 1.25 * wald


def test_paired_difference_counts_and_mcnemar():
    a = np.array([1] * 12 + [1] * 9 + [0] * 2 + [0] * 21)
    b = np.array([1] * 12 + [0] * 9 + [1] * 2 + [0] * 21)
    d = paired_difference(a, b)
    assert (d.n, d.a_only, d.b_only) == (44, 9, 2)
    assert d.diff == pytest.approx(7 / 44)
    assert d.lo < d.diff < d.hi and d.lo > -1 and d.hi < 1
    assert d.p_value == pytest.approx(stats.binomtest(9, 11, 0.5).pvalue)
    # swapping A and B mirrors the interval
    e = paired_difference(b, a)
    assert e.lo == pytest.approx(-d.hi) and e.hi == pytest.approx(-d.lo)


def test_paired_difference_identical_rows():
    a = np.array([1, 0, 1, 1, 0] * 20)
    d = paired_difference(a, a)
    assert d.diff == 0 and d.lo <= 0 <= d.hi and d.p_value == 1.0
    assert verdict(d.lo, d.hi, ">") == UNRESOLVED


def test_verdicts():
    assert verdict(0.01, 0.2, ">") == REPRODUCED
    assert verdict(-0.2, -0.01, ">") == CONTRADICTED
    assert verdict(-0.01, 0.2, ">") == UNRESOLVED
    assert verdict(-0.2, -0.01, "<") == REPRODUCED
    assert verdict(-0.03, 0.04, "≈", margin=0.05) == REPRODUCED
    assert verdict(0.06, 0.2, "≈", margin=0.05) == CONTRADICTED
    assert verdict(-0.03, 0.08, "≈", margin=0.05) == UNRESOLVED
