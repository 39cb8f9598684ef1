"""Input normalisation as the model's first layer.

Randomized smoothing adds noise to images in [0,1] pixel space, so σ is in pixel units; normalising
inside the model (rather than in the data pipeline) keeps that true and stores mean/std with the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from smoothtransfer.errors import UserError

# Cohen et al. (2019) normalise CIFAR-10 with these values; used when no mean/std is given.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


def _as_floats(values: Sequence[float] | torch.Tensor, what: str) -> list[float]:
    try:
        out = [float(v) for v in (values.flatten().tolist() if isinstance(values, torch.Tensor) else values)]
    except (TypeError, ValueError):
        raise UserError(f"input normalisation {what} must be a list of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise UserError(f"input normalisation {what} must be a non-empty list of finite numbers, got {out}")
    return out


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x``: ``(B, C, H, W)`` in [0,1] → same shape.

    ``mean`` and ``std`` are persistent buffers, so they are part of ``state_dict`` and move with ``.to()``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        m, s = _as_floats(mean, "mean"), _as_floats(std, "std")
        if len(m) != len(s):
            raise UserError(f"input normalisation mean has {len(m)} channels but std has {len(s)}")
        if min(s) <= 0:
            raise UserError(f"input normalisation std must be > 0, got {s}")
        self.mean_values, self.std_values = m, s  # plain floats, for the JSON spec
        self.register_buffer("mean", torch.tensor(m, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def num_channels(self) -> int:
        return len(self.mean_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` → ``(B, C, H, W)``."""
        # Cast the buffers rather than x, so a bf16/fp16 input stays in its dtype.
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean_values}, std={self.std_values}"
