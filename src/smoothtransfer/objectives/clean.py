"""Standard training: cross-entropy on clean images (the non-robust baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput


@OBJECTIVES.register("clean")
class CleanObjective(Objective):
    """Cross-entropy ``CE(f(x), y)`` on the clean batch; no parameters."""

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the clean logits ``(B,K)``."""
        logits = model(x)
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {})
