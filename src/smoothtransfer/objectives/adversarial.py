"""PGD-L2 adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018), for the empirical-robustness side of the comparisons.

The attack is our PGD-L2 (:func:`smoothtransfer.evaluation.attacks.pgd_l2_steps`): it works on our models
as they are, since they take [0,1] images and normalise inside. Adversarial examples stay in image space (clamped to [0,1]), unlike the unclamped
Gaussian-noise inputs of the smoothing objectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.attacks import pgd_l2_steps
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput
from smoothtransfer.objectives.gaussian import check_count, check_real


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for an attack, then restore every submodule's own train/eval flag.

    Attacks are generated in eval mode (as in Salman et al.'s and Madry et al.'s code): BatchNorm uses its
    running statistics, so the attack's forward passes neither update them nor see batch-coupled outputs.
    ``model.train()`` afterwards would be wrong when parts of the model are deliberately in eval mode
    (fixed-feature fine-tuning keeps the frozen body's BatchNorm in eval, design rule 9), so each module's
    flag is saved and restored as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training  # not .train(flag): that would recurse into the children


@OBJECTIVES.register("adversarial")
class AdversarialObjective(Objective):
    """Madry et al. (2018) with an L2 threat model: ``CE(f(x'), y)``, ``x' = PGD-L2(x)``,
    ``‖x' − x‖₂ ≤ ε``, ``x' ∈ [0,1]``.

    x' is generated with the model in eval mode and the loss is taken on x' in the model's own (train)
    mode, restored per module (see :func:`attack_mode`). The random start is drawn from ``generator``
    (a ``torch.Generator`` on the batch's device type), else from torch's default RNG, which the trainer seeds.

    Args:
        epsilon: L2 radius ε in [0,1] pixel units (default 0.5).
        steps: PGD steps (default 3).
        step_size: PGD step α (default ``2ε/steps``, i.e. 2ε/3 for 3 steps).
        random_start: start from a random point of the ε-ball (default True).
        generator: optional ``torch.Generator`` for the random starts.

    Returns the logits on x' ``(B,K)`` (robust training accuracy); logs ``adv_norm``, the mean ‖x' − x‖₂.
    """

    def __init__(self, epsilon: float = 0.5, steps: int = 3, step_size: float | None = None,
                 random_start: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.epsilon = check_real("epsilon", epsilon, positive=True)
        self.steps = check_count("steps", steps)
        self.step_size = (2.0 * self.epsilon / self.steps if step_size is None
                          else check_real("step_size", step_size, positive=True))
        if not isinstance(random_start, bool):
            raise UserError(f"random_start must be true or false, got {random_start!r}")
        self.random_start = random_start
        self.generator = generator

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x' ``(B,C,H,W)`` in [0,1] with ``‖x' − x‖₂ ≤ ε`` per image, maximising ``CE(f(x'), y)``."""
        with attack_mode(model), torch.enable_grad():
            x_adv = pgd_l2_steps(model, x.detach().float(), y, self.epsilon, self.steps, self.step_size,
                                 self.random_start, self.generator)
        x_adv = x_adv.to(x.dtype).detach()
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)  # keep the trainer's fast layout
        return x_adv

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the adversarial logits ``(B,K)``."""
        x_adv = self.attack(model, x, y)
        logits = model(x_adv)
        adv_norm = (x_adv - x).flatten(1).norm(dim=1).mean().item()
        return ObjectiveOutput(F.cross_entropy(logits, y), logits, {"adv_norm": adv_norm})

    def extra_repr(self) -> str:
        return (f"epsilon={self.epsilon}, steps={self.steps}, step_size={self.step_size}, "
                f"random_start={self.random_start}")
