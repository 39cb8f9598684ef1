"""Uncertainty of reported accuracies and of paired comparisons, and verdicts derived from them (pure).

Every accuracy an experiment table prints is ``k`` of ``n`` test images, so it carries an exact two-sided
Clopper-Pearson interval. A paper's comparison of row A with row B is evaluated on the *same* test images,
so the per-image indicators are paired: the difference of the two accuracies gets Newcombe's hybrid-score
interval for paired proportions (Newcombe 1998, "Improved confidence intervals for the difference between
binomial proportions based on paired data", method 10), and the exact McNemar test (binomial test on the
discordant pairs) gives its p-value. A verdict is computed from the interval, never written by hand:

- ``expect ">"`` (A better than B): reproduced when the whole interval is above 0, contradicted when it is
  below 0, otherwise not resolved at this scale;
- ``expect "<"``: the mirror image;
- ``expect "≈"`` with a ``margin`` (in accuracy points): reproduced when the interval lies inside
  ``[-margin, +margin]``, contradicted when it lies entirely outside it, otherwise not resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from smoothtransfer.errors import UserError

REPRODUCED, CONTRADICTED, UNRESOLVED = "reproduced", "contradicted", "not resolved at this scale"
EXPECTATIONS = (">", "<", "≈")


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided ``level`` interval for a binomial proportion with ``k`` successes in ``n`` trials."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return (lo, hi)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (the building block of Newcombe's paired interval)."""
    if n <= 0:
        return (math.nan, math.nan)
    z = float(stats.norm.ppf(1 - (1 - level) / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same ``n`` images (fractions), with its interval.

    ``a_only`` / ``b_only``: images only A / only B gets right (the discordant pairs McNemar's test uses).
    """

    n: int
    acc_a: float
    acc_b: float
    diff: float
    lo: float
    hi: float
    a_only: int
    b_only: int
    p_value: float


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> PairedDifference:
    """Newcombe's method-10 interval for ``mean(a) - mean(b)`` of paired 0/1 indicators ``(n,)`` each, and
    the exact two-sided McNemar p-value."""
    a = np.asarray(a).astype(bool).ravel()
    b = np.asarray(b).astype(bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired indicators need equal lengths, got {a.size} and {b.size}")
    n = int(a.size)
    if n == 0:
        raise UserError("a paired comparison needs at least one image common to both rows")
    both = int(np.sum(a & b))
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    neither = n - both - a_only - b_only
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson(both + a_only, n, level)
    l2, u2 = wilson(both + b_only, n, level)
    denom = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / math.sqrt(denom) if denom > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    disc = a_only + b_only
    p_value = 1.0 if disc == 0 else float(stats.binomtest(a_only, disc, 0.5).pvalue)
    return PairedDifference(n=n, acc_a=p1, acc_b=p2, diff=d, lo=max(-1.0, lo), hi=min(1.0, hi),
                            a_only=a_only, b_only=b_only, p_value=p_value)


def verdict(lo: float, hi: float, expect: str, margin: float = 0.0) -> str:
    """Reproduced / contradicted / not resolved, from the interval ``[lo, hi]`` of A − B (fractions)."""
    if expect not in EXPECTATIONS:
        raise UserError(f"a claim's expect must be one of {' '.join(EXPECTATIONS)}, got {expect!r}")
    if math.isnan(lo) or math.isnan(hi):
        return UNRESOLVED
    if expect == ">":
        return REPRODUCED if lo > 0 else CONTRADICTED if hi < 0 else UNRESOLVED
    if expect == "<":
        return REPRODUCED if hi < 0 else CONTRADICTED if lo > 0 else UNRESOLVED
    if margin <= 0:
        raise UserError("a '≈' claim needs a margin > 0 (in accuracy points)")
    if -margin <= lo and hi <= margin:
        return REPRODUCED
    if hi < -margin or lo > margin:
        return CONTRADICTED
    return UNRESOLVED


def format_interval(k: int, n: int, digits: int = 1) -> str:
    """``"71.4 [67.3, 75.2]"``: the accuracy ``k/n`` in percent with its 95% Clopper-Pearson interval."""
    if n <= 0:
        return "–"
    lo, hi = clopper_pearson(k, n)
    return f"{100 * k / n:.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


__all__ = [
    "CONTRADICTED",
    "EXPECTATIONS",
    "REPRODUCED",
    "UNRESOLVED",
    "PairedDifference",
    "clopper_pearson",
    "format_interval",
    "paired_difference",
    "verdict",
    "wilson",
]
