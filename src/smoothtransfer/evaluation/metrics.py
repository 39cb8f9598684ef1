"""Certified-accuracy metrics of a smoothed classifier (pure functions, no I/O).

Every function takes per-image certificate rows as array-likes of length ``N`` (numpy arrays, torch
tensors or lists), as written by :func:`smoothtransfer.smoothing.runner.certify_dataset`:

- ``radii`` float ``(N,)``: certified L2 radius in [0,1] pixel units (0 for abstentions),
- ``correct`` bool/int ``(N,)``: 1 when the smoothed prediction equals the label (abstentions are wrong),
- ``predictions`` int ``(N,)``: the smoothed prediction, ``-1`` (``ABSTAIN``) for an abstention.

Definitions follow Cohen et al. (2019), ``analyze.py``: the certified accuracy at radius ``r`` is the
fraction of *all* rows that are correct with radius ``>= r``; at ``r = 0`` this is the accuracy of the
smoothed classifier as computed by CERTIFY (abstentions count as wrong). The average certified radius
(ACR, Zhai et al. 2020) is the mean over all rows of ``radius * correct``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ABSTAIN = -1
DEFAULT_RADIUS_STEP = 0.25


def _as_1d(x: Any, name: str, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _rows(radii: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    r = _as_1d(radii, "radii", np.float64)
    c = _as_1d(correct, "correct", np.float64) != 0
    if r.shape != c.shape:
        raise ValueError(f"radii and correct differ in length: {r.shape[0]} vs {c.shape[0]}")
    return r, c


def certified_accuracy(radii: Any, correct: Any, thresholds: Any) -> np.ndarray:
    """Certified accuracy at each radius threshold.

    Args:
        radii: ``(N,)`` certified radii.
        correct: ``(N,)`` 1/True where the smoothed prediction is correct (abstentions: 0).
        thresholds: ``(R,)`` radii ``r`` at which to evaluate (a scalar gives a 0-d result).

    Returns:
        float64 ``(R,)``: fraction of the N rows with ``correct and radius >= r``; NaN when ``N == 0``.
        Non-increasing in ``r`` by construction.
    """
    r, c = _rows(radii, correct)
    t = np.asarray(thresholds, dtype=np.float64)
    if r.size == 0:
        return np.full(t.shape, np.nan)
    # hits[i, j] = row i counts at threshold j
    hits = c[:, None] & (r[:, None] >= t.reshape(1, -1))
    return hits.mean(axis=0).reshape(t.shape)


def acr(radii: Any, correct: Any) -> float:
    """Average certified radius: mean over all ``N`` rows of ``radius * correct`` (NaN when ``N == 0``).

    Equals (mean radius of the correct rows) x (fraction of rows that are correct).
    """
    r, c = _rows(radii, correct)
    if r.size == 0:
        return math.nan
    return float(np.mean(np.where(c, r, 0.0)))


def accuracy(correct: Any) -> float:
    """Fraction of correct rows ``(N,)`` (NaN when empty)."""
    c = _as_1d(correct, "correct", np.float64) != 0
    return float(c.mean()) if c.size else math.nan


def abstain_rate(predictions: Any) -> float:
    """Fraction of rows ``(N,)`` whose smoothed prediction is ``ABSTAIN`` (-1); NaN when empty."""
    p = _as_1d(predictions, "predictions", np.int64)
    return float((p == ABSTAIN).mean()) if p.size else math.nan


def radius_key(r: float) -> str:
    """The JSON key of a radius in ``certified_accuracy`` dicts: ``"0"``, ``"0.25"``, ``"0.5"``, ``"1"``
    (``%g``; readers should compare ``float(key)``)."""
    return f"{float(r):g}"


def radius_grid(max_radius: float, step: float = DEFAULT_RADIUS_STEP) -> list[float]:
    """Radii ``0, step, 2*step, ...`` up to and including the last multiple of ``step`` <= ``max_radius``.

    With ``max_radius`` the maximum certifiable radius (``sigma * Phi^-1(alpha**(1/n))``), every grid point
    beyond the returned list has certified accuracy 0.
    """
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    if not math.isfinite(max_radius) or max_radius < 0:
        return [0.0]
    k = int(math.floor(max_radius / step + 1e-9))
    return [round(i * step, 10) for i in range(k + 1)]


def summarize_certificates(
    radii: Any,
    correct: Any,
    predictions: Any,
    *,
    thresholds: Sequence[float],
    times: Any = None,
    samples_per_image: Any = None,
) -> dict[str, Any]:
    """Json-able summary of one certification run (one sigma).

    Args:
        radii, correct, predictions: ``(N,)`` rows (see module docstring).
        thresholds: radii at which to report certified accuracy.
        times: optional ``(N,)`` seconds spent per image, for throughput.
        samples_per_image: noise samples per image, for samples/s: an int (``n0 + n``) or ``(N,)`` counts
            (sequential certification draws a different number per image).

    Returns:
        dict with ``num_images``, ``certified_accuracy`` (``{radius_key(r): accuracy}``, e.g.
        ``{"0": 0.72, "0.25": 0.61, ...}``), ``acr``,
        ``clean_accuracy`` (certified accuracy at r=0 from CERTIFY: the smoothed classifier's accuracy with
        abstentions wrong), ``abstain_rate``, ``mean_radius_correct``, and when ``times`` is given
        ``seconds``, ``images_per_s``, ``samples_per_s``.
    """
    r, c = _rows(radii, correct)
    p = _as_1d(predictions, "predictions", np.int64)
    if p.shape != r.shape:
        raise ValueError(f"predictions and radii differ in length: {p.shape[0]} vs {r.shape[0]}")
    thr = [float(t) for t in thresholds]
    out: dict[str, Any] = {
        "num_images": int(r.size),
        "certified_accuracy": {radius_key(t): float(a) for t, a in zip(thr, certified_accuracy(r, c, thr))},
        "acr": acr(r, c),
        "clean_accuracy": float(certified_accuracy(r, c, [0.0])[0]),
        "abstain_rate": abstain_rate(p),
        "mean_radius_correct": float(r[c].mean()) if c.any() else math.nan,
    }
    if times is not None:
        t = _as_1d(times, "times", np.float64)
        total = float(t.sum())
        out["seconds"] = total
        out["images_per_s"] = r.size / total if total > 0 else math.nan
        if samples_per_image is not None:
            spi = np.asarray(samples_per_image, dtype=np.float64)
            samples = float(spi.sum()) if spi.ndim else float(spi) * r.size
            out["samples"] = samples
            out["samples_per_s"] = samples / total if total > 0 else math.nan
    return out
