"""Gaussian noise in [0,1] pixel space, with one σ or a per-image σ drawn from a finite mixture.

Noise is always drawn in float32 (soundness rule 6): a caller running the model in bf16/fp16 adds the
float32 noise first and casts afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from smoothtransfer.errors import UserError


def gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise δ ~ N(0, σ²I) with the shape of ``x``.

    Args:
        x: ``(B,...)`` images; only the shape and device are used.
        sigma: a float, a 0-d tensor, or a ``(B,)`` tensor with one σ per image.
        generator: optional ``torch.Generator`` on ``x.device``.

    Returns:
        float32 tensor of ``x.shape`` on ``x.device`` (add it to ``x``; it is not added here).
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(device=x.device, dtype=torch.float32)
        if s.dim() == 0:
            return noise.mul_(s)
        if s.dim() != 1 or x.dim() == 0 or s.shape[0] != x.shape[0]:
            raise ValueError(f"per-image sigma must have shape ({x.shape[0] if x.dim() else 0},), "
                             f"got {tuple(s.shape)}")
        return noise.mul_(s.view(-1, *([1] * (x.dim() - 1))))
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise UserError(f"noise sigma must be a finite number >= 0, got {sigma}")
    return noise.mul_(sigma)


class MixedSigmaSampler:
    """Draws one σ per image i.i.d. from a finite set ``sigmas`` with probabilities ∝ ``weights``.

    >>> s = MixedSigmaSampler([0.25, 0.5, 1.0])           # uniform
    >>> s.sample(4, generator=torch.Generator().manual_seed(0))  # (4,) float32
    """

    def __init__(self, sigmas: Sequence[float] | float, weights: Sequence[float] | None = None) -> None:
        if isinstance(sigmas, (int, float)):
            sigmas = [sigmas]
        sigmas = [float(s) for s in sigmas]
        if not sigmas:
            raise UserError("mixed sigma needs at least one sigma")
        if not all(math.isfinite(s) and s >= 0 for s in sigmas):
            raise UserError(f"every sigma must be a finite number >= 0, got {sigmas}")
        if weights is None:
            weights = [1.0] * len(sigmas)
        weights = [float(w) for w in weights]
        if len(weights) != len(sigmas):
            raise UserError(f"got {len(weights)} sigma weights for {len(sigmas)} sigmas; give one per sigma")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"sigma weights must be finite, >= 0 and not all zero, got {weights}")
        total = sum(weights)
        self.sigmas: tuple[float, ...] = tuple(sigmas)
        self.probs: tuple[float, ...] = tuple(w / total for w in weights)
        self._sigmas = torch.tensor(self.sigmas, dtype=torch.float32)
        self._probs = torch.tensor(self.probs, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """``(batch_size,)`` float32 σ values on ``device`` (default: the generator's device, else CPU)."""
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.multinomial(self._probs.to(gen_dev), batch_size, replacement=True, generator=generator)
        out = self._sigmas.to(gen_dev)[idx]
        return out.to(device) if device is not None else out

    @property
    def mean_sigma(self) -> float:
        """E[σ] under the mixture."""
        return sum(s * p for s, p in zip(self.sigmas, self.probs, strict=True))

    def __repr__(self) -> str:
        return f"MixedSigmaSampler(sigmas={list(self.sigmas)}, probs={[round(p, 4) for p in self.probs]})"


__all__ = ["MixedSigmaSampler", "gaussian_noise"]
