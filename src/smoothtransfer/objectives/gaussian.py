"""Gaussian data augmentation (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019), plus the small helpers the other noise-based objectives share.

The noise is added in [0,1] pixel space, before the model's input normalisation, and ``x + δ`` is not
clamped: the smoothed classifier that is certified later sees unclamped ``x + δ`` as well.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.data.noise import gaussian_noise
from smoothtransfer.errors import UserError
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput

# ----------------------------------------------------------------------------------------------------
# parameter checks shared by the objectives (bad values raise UserError in the constructor)


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float; a UserError unless it is a finite real ``>= 0`` (``> 0`` if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise UserError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as an int; a UserError unless it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def noisy_copies(x: torch.Tensor, sigma: float, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m`` noisy copies of a batch, copy-major: ``x`` ``(B,C,H,W)`` -> ``(m*B,C,H,W)`` with rows
    ``[x+δ_1; …; x+δ_m]``, ``δ_i ~ N(0, σ²I)`` i.i.d., so ``.view(m, B, …)`` separates the copies."""
    x_rep = x.repeat(m, 1, 1, 1)
    return x_rep + gaussian_noise(x_rep, sigma, generator=generator)


# ----------------------------------------------------------------------------------------------------


@OBJECTIVES.register("gaussian")
class GaussianObjective(Objective):
    """Cohen et al. (2019): ``CE(f(x+δ), y)``, ``δ ~ N(0, σ²I)``, one noise draw per image and step.

    Args:
        sigma: noise level σ in [0,1] pixel units (default 0.25); train at the σ you will certify at.
        generator: optional ``torch.Generator`` (on the batch's device) for reproducible noise.
    """

    def __init__(self, sigma: float = 0.25, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma = check_real("sigma", sigma)
        self.generator = generator

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the noisy logits ``(B,K)``."""
        logits = model(x + gaussian_noise(x, self.sigma, generator=self.generator))
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {})

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
