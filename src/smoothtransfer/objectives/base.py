"""The one interface every training objective implements.

An objective maps ``(model, x, y)`` to a scalar loss, logits for accuracy logging and a dict of floats to log.
Objectives are ``nn.Module`` so that those with parameters of their own (the SimCLR projection head) are
optimised together with the model and saved with the training state.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.registry import Registry


class ObjectiveOutput(NamedTuple):
    """``loss``: scalar tensor; ``logits``: ``(B, K)`` (clean or first noisy view); ``logs``: floats to log."""

    loss: torch.Tensor
    logits: torch.Tensor
    logs: dict[str, float]


class Objective(nn.Module):
    """Base class: subclasses implement :meth:`forward`.

    ``uses_labels`` is False for self-supervised objectives (SimCLR), which ignore ``y``.
    """

    uses_labels: bool = True

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:  # noqa: D401
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)`` int64."""
        raise NotImplementedError


#: Every objective is registered by the time anyone can call :func:`build_objective`: importing this module
#: first runs the package's ``__init__``, which imports each objective's module.
OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def build_objective(name: str, **params) -> Objective:
    """Instantiate the objective registered as ``name``; unknown parameters are a UserError."""
    cls = OBJECTIVES.get(name)
    sig = inspect.signature(cls.__init__)
    accepted = {p for p in sig.parameters if p != "self"}
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(set(params) - accepted)
    if unknown and not has_var_kw:
        raise UserError(
            f"objective '{name}' does not take parameter(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**params)
