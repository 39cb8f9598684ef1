"""Mixed-σ Gaussian augmentation (Qiu et al., "Exploring Transferability for Randomized Smoothing").

Each image gets its own noise level σ_i drawn from a finite set S (optionally weighted), so one base
classifier learns to be accurate across noise levels; σ = 0 in S keeps clean images in the mix.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.data.noise import MixedSigmaSampler, gaussian_noise
from smoothtransfer.errors import UserError
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput


@OBJECTIVES.register("mixed")
class MixedSigmaObjective(Objective):
    """``CE(f(x_i + σ_i·ε_i), y_i)`` with ``σ_i ~ S`` (categorical, ``weights``) and ``ε_i ~ N(0, I)``.

    Args:
        sigmas: the finite set S of noise levels in [0,1] pixel units (default ``(0, 0.25, 0.5, 1.0)``).
        weights: sampling weights of the σ's (default uniform); need not sum to 1.
        generator: optional ``torch.Generator`` (on the batch's device) for reproducible σ's and noise.

    Logs ``sigma_mean``, the batch mean of the drawn σ_i.
    """

    def __init__(self, sigmas: Sequence[float] = (0.0, 0.25, 0.5, 1.0), weights: Sequence[float] | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(sigmas, numbers.Real):  # `sigmas: 0.5` in a config means S = {0.5}
            sigmas = (sigmas,)
        for name, values in (("sigmas", sigmas), ("weights", weights)):
            # checked here so that a string or a mapping fails with one clear line, not deep in float()
            if values is not None and (isinstance(values, str) or not isinstance(values, Sequence)):
                raise UserError(f"{name} must be a list of numbers, got {values!r}")
        self.sampler = MixedSigmaSampler(sigmas, weights)  # validates values and lengths (UserError)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.generator = generator

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the noisy logits ``(B,K)``."""
        sigma = self.sampler.sample(x.shape[0], generator=self.generator, device=x.device)  # (B,)
        logits = model(x + gaussian_noise(x, sigma, generator=self.generator))
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {"sigma_mean": sigma.mean().item()})

    def extra_repr(self) -> str:
        return f"sigmas={self.sigmas}, weights={self.weights}"
