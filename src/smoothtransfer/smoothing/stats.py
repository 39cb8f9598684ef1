"""Pure statistics for randomized smoothing (numpy/scipy only, no torch).

Notation follows Cohen, Rosenfeld & Kolter (2019): the smoothed classifier returns class ``c_A`` with
probability ``p_A`` under Gaussian noise of scale ``sigma``; from ``k`` votes for ``c_A`` among ``n``
independent noisy samples, ``p_lower`` is a one-sided Clopper-Pearson lower confidence bound at level
``alpha`` and the certified L2 radius is ``sigma * Phi^{-1}(p_lower)`` (abstain when ``p_lower < 1/2``).

Every function accepts python scalars or numpy arrays (broadcast together) and returns a python ``float``
when all inputs are scalars, else a float64 ``ndarray``. Bad arguments raise :class:`UserError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta as _beta
from scipy.stats import binomtest as _binomtest
from scipy.stats import norm as _norm

from smoothtransfer.errors import UserError

__all__ = [
    "binom_pvalue",
    "certified_radius",
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "max_certifiable_radius",
]


def _is_scalar(*xs: Any) -> bool:
    return all(np.ndim(x) == 0 for x in xs)


def _out(value: np.ndarray, scalar: bool) -> float | np.ndarray:
    return float(value) if scalar else value


def _check_alpha(alpha: Any) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.any(a <= 0) or np.any(a >= 1):
        raise UserError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return a


def _check_sigma(sigma: Any) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise UserError(f"sigma must be a positive number, got {sigma}")
    return s


def _check_counts(k: Any, n: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate integer counts ``0 <= k <= n``, ``n >= 1``; returns int64 arrays broadcast together."""
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    for name, arr in (("k", k_arr), ("n", n_arr)):
        if arr.dtype.kind not in "iu":
            # Accept integral floats (e.g. 5.0 from a TSV) but not 5.5: a count is an integer.
            if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise UserError(f"{name} must be an integer count, got {arr if arr.ndim else arr.item()}")
    k_arr = k_arr.astype(np.int64)
    n_arr = n_arr.astype(np.int64)
    if np.any(n_arr < 1):
        raise UserError(f"the number of samples n must be >= 1, got {n}")
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise UserError(f"the count k must satisfy 0 <= k <= n, got k={k}, n={n}")
    return np.broadcast_arrays(k_arr, n_arr)


def clopper_pearson_lower(k: Any, n: Any, alpha: Any) -> float | np.ndarray:
    """One-sided Clopper-Pearson lower bound: ``P(p_lower(K) <= p) >= 1 - alpha`` for ``K ~ Bin(n, p)``.

    ``beta.ppf(alpha, k, n-k+1)``, and 0 for ``k = 0``. Equals
    ``statsmodels.proportion_confint(k, n, alpha=2*alpha, method="beta")[0]`` as used in Cohen's code.

    Args:
        k: votes for the class, ``0 <= k <= n`` (scalar or array).
        n: number of samples, ``>= 1``.
        alpha: one-sided error level in (0, 1).
    """
    scalar = _is_scalar(k, n, alpha)
    k_arr, n_arr = _check_counts(k, n)
    a = _check_alpha(alpha)
    with np.errstate(invalid="ignore"):
        # beta.ppf with a=0 is nan: the k=0 bound is 0 by definition.
        lower = _beta.ppf(a, np.maximum(k_arr, 1), n_arr - k_arr + 1)
    lower = np.where(k_arr == 0, 0.0, lower).astype(np.float64)
    return _out(lower, scalar)


def clopper_pearson_upper(k: Any, n: Any, alpha: Any) -> float | np.ndarray:
    """One-sided Clopper-Pearson upper bound: ``P(p_upper(K) >= p) >= 1 - alpha``; 1 for ``k = n``."""
    scalar = _is_scalar(k, n, alpha)
    k_arr, n_arr = _check_counts(k, n)
    a = _check_alpha(alpha)
    with np.errstate(invalid="ignore"):
        upper = _beta.ppf(1.0 - a, k_arr + 1, np.maximum(n_arr - k_arr, 1))
    upper = np.where(k_arr == n_arr, 1.0, upper).astype(np.float64)
    return _out(upper, scalar)


def clopper_pearson_interval(k: Any, n: Any, alpha: Any) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson interval with coverage ``>= 1 - alpha`` (``alpha/2`` in each tail).

    Returns ``(lower, upper)``. Note the certificate uses the *one-sided* :func:`clopper_pearson_lower`
    at ``alpha``, which equals this interval's lower end at ``2*alpha``.
    """
    half = _check_alpha(alpha) / 2  # a 0-d array stays "scalar" for the return type
    return clopper_pearson_lower(k, n, half), clopper_pearson_upper(k, n, half)


def binom_pvalue(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test p-value of ``k`` successes in ``n`` trials (``scipy.stats.binomtest``).

    Cohen's PREDICT abstains unless ``binom_pvalue(n_A, n_A + n_B, 0.5) <= alpha``.
    """
    _check_counts(k, n)
    if not np.ndim(k) == np.ndim(n) == 0:
        raise UserError("binom_pvalue takes scalar k and n")
    if not (0.0 <= float(p) <= 1.0):
        raise UserError(f"p must lie in [0, 1], got {p}")
    return float(_binomtest(int(k), int(n), float(p), alternative="two-sided").pvalue)


def certified_radius(sigma: Any, p_lower: Any) -> float | np.ndarray:
    """L2 radius ``sigma * Phi^{-1}(p_lower)`` (Cohen et al. 2019, Thm. 1 with ``p_B = 1 - p_lower``).

    Negative for ``p_lower < 1/2`` — callers abstain there. ``p_lower = 1`` gives ``inf``, which a finite
    sample never produces (see :func:`max_certifiable_radius`).
    """
    scalar = _is_scalar(sigma, p_lower)
    s = _check_sigma(sigma)
    p = np.asarray(p_lower, dtype=np.float64)
    if np.any(~(p >= 0)) or np.any(p > 1):
        raise UserError(f"p_lower must lie in [0, 1], got {p_lower}")
    return _out((s * _norm.ppf(p)).astype(np.float64), scalar)


def max_certifiable_radius(sigma: Any, n: Any, alpha: Any) -> float | np.ndarray:
    """The largest radius ``n`` samples can certify: all ``n`` votes agree, ``p_lower = alpha**(1/n)``.

    About ``3.81 * sigma`` for ``n = 100_000`` and ``3.20 * sigma`` for ``n = 10_000`` at ``alpha = 0.001``.
    """
    scalar = _is_scalar(sigma, n, alpha)
    s = _check_sigma(sigma)
    _, n_arr = _check_counts(0, n)
    a = _check_alpha(alpha)
    # alpha**(1/n) = beta.ppf(alpha, n, 1); Phi^{-1}(1 - q) = -Phi^{-1}(q) with q = -expm1(log(alpha)/n),
    # which keeps full precision when alpha**(1/n) rounds to 1 - tiny.
    q = -np.expm1(np.log(a) / n_arr)
    return _out((s * -_norm.ppf(q)).astype(np.float64), scalar)

