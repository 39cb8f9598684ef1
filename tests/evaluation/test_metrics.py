"""Certified accuracy and ACR (pure functions): hand-computed cases and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smoothtransfer.evaluation.metrics import (
    abstain_rate,
    accuracy,
    acr,
    certified_accuracy,
    radius_grid,
    summarize_certificates,
)

# 5 rows: correct r=0.6, correct r=0.2, wrong r=0.9 (confident mistake), abstain, correct r=0.0 (p_lower=1/2)
RADII = [0.6, 0.2, 0.9, 0.0, 0.0]
CORRECT = [1, 1, 0, 0, 1]
PREDS = [3, 1, 2, -1, 0]


def test_hand_computed_certified_accuracy():
    acc = certified_accuracy(RADII, CORRECT, [0.0, 0.1, 0.2, 0.5, 0.6, 0.61, 1.0])
    np.testing.assert_allclose(acc, [3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0, 0.0])


def test_zero_radius_counts_correct_rows_and_abstentions_are_wrong():
    # At r=0 a correct non-abstaining row counts even with radius exactly 0; the abstention never counts.
    assert certified_accuracy(RADII, CORRECT, [0.0])[0] == pytest.approx(3 / 5)
    assert certified_accuracy([0.0], [0], [0.0])[0] == 0.0


def test_wrong_rows_never_count_whatever_their_radius():
    assert certified_accuracy([5.0, 5.0], [0, 0], [0.0, 1.0]).tolist() == [0.0, 0.0]


def test_acr_hand_computed_and_equals_mean_correct_radius_times_fraction():
    assert acr(RADII, CORRECT) == pytest.approx((0.6 + 0.2 + 0.0) / 5)
    rng = np.random.default_rng(0)
    r = rng.exponential(0.5, 200)
    c = rng.random(200) < 0.7
    assert acr(r, c) == pytest.approx(r[c].mean() * c.mean())


def test_non_increasing_in_radius_on_random_rows():
    rng = np.random.default_rng(1)
    r = rng.exponential(0.4, 500)
    c = rng.random(500) < 0.6
    grid = np.linspace(0, 3, 301)
    acc = certified_accuracy(r, c, grid)
    assert np.all(np.diff(acc) <= 0)
    assert acc[0] == pytest.approx(c.mean())


def test_acr_is_integral_of_certified_accuracy():
    # ACR = ∫_0^∞ certacc(r) dr (each correct row contributes its radius).
    rng = np.random.default_rng(2)
    r = rng.uniform(0, 1, 50)
    c = rng.random(50) < 0.5
    grid = np.linspace(0, 1.0, 200_001)
    integral = np.trapezoid(certified_accuracy(r, c, grid), grid) if hasattr(np, "trapezoid") else \
        np.trapz(certified_accuracy(r, c, grid), grid)
    assert integral == pytest.approx(acr(r, c), abs=1e-4)


def test_accepts_torch_tensors_and_bools():
    acc = certified_accuracy(torch.tensor(RADII), torch.tensor(CORRECT, dtype=torch.bool), torch.tensor([0.0, 0.5]))
    np.testing.assert_allclose(acc, [0.6, 0.2])
    assert certified_accuracy(RADII, CORRECT, 0.5).shape == ()


def test_empty_and_mismatched_inputs():
    assert math.isnan(acr([], []))
    assert np.isnan(certified_accuracy([], [], [0.0, 1.0])).all()
    with pytest.raises(ValueError, match="differ in length"):
        certified_accuracy([0.1, 0.2], [1], [0.0])


def test_abstain_rate_and_accuracy():
    assert abstain_rate(PREDS) == pytest.approx(1 / 5)
    assert accuracy(CORRECT) == pytest.approx(3 / 5)


def test_radius_grid():
    assert radius_grid(0.99) == [0.0, 0.25, 0.5, 0.75]
    assert radius_grid(1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert radius_grid(0.1) == [0.0]
    assert radius_grid(0.3, step=0.1) == [0.0, 0.1, 0.2, 0.3]
    with pytest.raises(ValueError):
        radius_grid(1.0, step=0)


def test_summarize_certificates_fields():
    s = summarize_certificates(RADII, CORRECT, PREDS, thresholds=[0.0, 0.25, 0.5], times=[1.0] * 5,
                               samples_per_image=110)
    assert s["num_images"] == 5
    assert s["certified_accuracy"] == pytest.approx({"0": 0.6, "0.25": 0.2, "0.5": 0.2})
    assert s["clean_accuracy"] == pytest.approx(0.6)
    assert s["acr"] == pytest.approx(0.16)
    assert s["abstain_rate"] == pytest.approx(0.2)
    assert s["images_per_s"] == pytest.approx(1.0)
    assert s["samples_per_s"] == pytest.approx(110.0)
    per_row = summarize_certificates(RADII, CORRECT, PREDS, thresholds=[0.0], times=[1.0] * 5,
                                     samples_per_image=[10, 20, 30, 40, 50])
    assert per_row["samples_per_s"] == pytest.approx(150 / 5)
