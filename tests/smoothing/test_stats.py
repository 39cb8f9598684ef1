"""Exact (no sampling) checks of the Clopper-Pearson bounds, the binomial test and the radius formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.stats import (
    binom_pvalue,
    certified_radius,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_certifiable_radius,
)

# Irrational-ish grid steps so that no grid point coincides with a bound, where coverage is discontinuous.
P_GRID = np.concatenate([np.linspace(1e-4, 1 - 1e-4, 401) * (1 - 1e-7) + 1e-9 * math.pi,
                         [0.5, 0.9, 0.99, 0.999, 0.9999]])


def _coverage(bounds_ok: np.ndarray, n: int, p: np.ndarray) -> np.ndarray:
    """``P_{K ~ Bin(n,p)}(bound(K) is on the right side of p)`` for each p, summed exactly over k=0..n."""
    k = np.arange(n + 1)
    pmf = binom.pmf(k[None, :], n, p[:, None])  # (len(p), n+1)
    return (pmf * bounds_ok).sum(axis=1)


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_lower_bound_exact_coverage(n, alpha):
    k = np.arange(n + 1)
    lower = clopper_pearson_lower(k, n, alpha)
    cover = _coverage(lower[None, :] <= P_GRID[:, None], n, P_GRID)
    assert cover.min() >= 1 - alpha - 1e-12


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_upper_and_two_sided_exact_coverage(n, alpha):
    k = np.arange(n + 1)
    upper = clopper_pearson_upper(k, n, alpha)
    assert _coverage(upper[None, :] >= P_GRID[:, None], n, P_GRID).min() >= 1 - alpha - 1e-12
    lo, hi = clopper_pearson_interval(k, n, alpha)
    inside = (lo[None, :] <= P_GRID[:, None]) & (P_GRID[:, None] <= hi[None, :])
    assert _coverage(inside, n, P_GRID).min() >= 1 - alpha - 1e-12


@pytest.mark.parametrize("n", [10, 1000])
def test_lower_bound_is_exact_not_just_conservative(n):
    """Clopper-Pearson is the tightest valid bound: at ``p = lower(k)``, ``P(K >= k) = alpha`` exactly."""
    alpha = 0.01
    k = np.arange(1, n + 1)
    lower = clopper_pearson_lower(k, n, alpha)
    np.testing.assert_allclose(binom.sf(k - 1, n, lower), alpha, rtol=1e-6)


def test_edge_cases_k0_and_kn():
    n, alpha = 50, 0.01
    assert clopper_pearson_lower(0, n, alpha) == 0.0
    assert math.isclose(clopper_pearson_lower(n, n, alpha), alpha ** (1 / n), rel_tol=1e-12)
    assert clopper_pearson_upper(n, n, alpha) == 1.0
    assert math.isclose(clopper_pearson_upper(0, n, alpha), 1 - alpha ** (1 / n), rel_tol=1e-12)
    # n = 1: the only informative outcome is k = 1, with bound alpha.
    assert math.isclose(clopper_pearson_lower(1, 1, 0.05), 0.05, rel_tol=1e-12)


def test_known_values():
    # Two-sided 95% exact interval for 5/10 (textbook value).
    lo, hi = clopper_pearson_interval(5, 10, 0.05)
    assert lo == pytest.approx(0.187086, abs=1e-6) and hi == pytest.approx(0.812914, abs=1e-6)
    # One-sided at alpha = two-sided lower at 2 alpha: what Cohen's code computes with statsmodels.
    assert clopper_pearson_lower(5, 10, 0.05) == pytest.approx(clopper_pearson_interval(5, 10, 0.10)[0])
    assert clopper_pearson_lower(5, 10, 0.05) == pytest.approx(0.222441, abs=1e-6)
    assert binom_pvalue(60, 100) == pytest.approx(0.056888, abs=1e-6)
    assert binom_pvalue(50, 100) == 1.0
    assert binom_pvalue(40, 100) == pytest.approx(binom_pvalue(60, 100))
    assert binom_pvalue(3, 10, 0.3) == pytest.approx(1.0)


def test_matches_statsmodels_if_installed():
    sm = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in [(0, 10), (3, 10), (990, 1000), (100_000, 100_000), (87_000, 100_000)]:
        ref = sm.proportion_confint(k, n, alpha=2 * 0.001, method="beta")[0]
        assert clopper_pearson_lower(k, n, 0.001) == pytest.approx(ref, abs=1e-12)


def test_radius_values():
    assert certified_radius(0.5, 0.5) == 0.0
    assert certified_radius(1.0, norm.cdf(1.0)) == pytest.approx(1.0)
    assert certified_radius(0.25, 0.95) == pytest.approx(0.25 * 1.6448536, rel=1e-6)
    assert certified_radius(0.25, 0.3) < 0  # callers abstain there
    # Soundness rule 4: N caps the radius.
    assert max_certifiable_radius(1.0, 100_000, 0.001) == pytest.approx(3.81, abs=0.005)
    assert max_certifiable_radius(1.0, 10_000, 0.001) == pytest.approx(3.20, abs=0.005)
    assert max_certifiable_radius(0.5, 100_000, 0.001) == pytest.approx(0.5 * 3.8115, abs=1e-3)
    # It is the radius of the all-agree outcome.
    for n in (10, 1000, 100_000):
        assert max_certifiable_radius(0.25, n, 0.001) == pytest.approx(
            certified_radius(0.25, clopper_pearson_lower(n, n, 0.001)), rel=1e-9)


def test_vectorised_matches_scalar():
    k = np.array([0, 3, 7, 10])
    vec = clopper_pearson_lower(k, 10, 0.01)
    assert isinstance(vec, np.ndarray) and vec.shape == (4,)
    assert vec.tolist() == [clopper_pearson_lower(int(i), 10, 0.01) for i in k]
    assert isinstance(clopper_pearson_lower(3, 10, 0.01), float)
    r = certified_radius(np.array([0.25, 0.5]), 0.9)
    assert r.shape == (2,) and r[1] == pytest.approx(2 * r[0])
    assert isinstance(clopper_pearson_lower(np.int64(3), np.int64(10), 0.01), float)
    assert clopper_pearson_lower(3.0, 10.0, 0.01) == clopper_pearson_lower(3, 10, 0.01)


@pytest.mark.parametrize("call", [
    lambda: clopper_pearson_lower(1, 0, 0.01),
    lambda: clopper_pearson_lower(-1, 10, 0.01),
    lambda: clopper_pearson_lower(11, 10, 0.01),
    lambda: clopper_pearson_lower(2.5, 10, 0.01),
    lambda: clopper_pearson_lower(np.array([1, 12]), 10, 0.01),
    lambda: clopper_pearson_lower(1, 10, 0.0),
    lambda: clopper_pearson_lower(1, 10, 1.0),
    lambda: clopper_pearson_upper(1, 10, float("nan")),
    lambda: clopper_pearson_interval(1, 10, -0.1),
    lambda: binom_pvalue(5, 4),
    lambda: binom_pvalue(1, 4, p=1.5),
    lambda: certified_radius(0.0, 0.9),
    lambda: certified_radius(-0.25, 0.9),
    lambda: certified_radius(0.25, 1.5),
    lambda: certified_radius(0.25, float("nan")),
    lambda: max_certifiable_radius(0.25, 0, 0.001),
    lambda: max_certifiable_radius(0.25, 100, 2.0),
])
def test_bad_input_raises_user_error(call):
    with pytest.raises(UserError):
        call()
