"""SmoothAdv-PGD (Salman et al., "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", NeurIPS 2019): adversarial training of the *smoothed* classifier.

For m noise draws δ_1..δ_m, held fixed during the attack, PGD-L2 maximises the loss of the soft smoothed
classifier

    ℓ(x') = −log( 1/m Σ_i softmax(f(x'+δ_i))_y )

over x' in the ε-ball around x (and in [0,1]), then the model is trained with ``1/m Σ_i CE(f(x'+δ_i), y)``
on the *same* δ_i. This follows the authors' code (``PGD_L2._attack_mutlinoise``): the attack starts at x,
steps along the per-image L2-normalised gradient with step ``2ε/steps``, clamps x' to [0,1] and projects
onto the ε-ball; a zero gradient is replaced by a random direction. x' + δ_i is not clamped.

ε warm-up: the trainer calls ``objective.set_epoch(epoch)`` (0-based) at the start of every epoch, if the
objective has that method. Then ε_e = min(ε, (e+1)·ε/warmup), the reference schedule (linear growth that
reaches ε at epoch ``warmup − 1``). Before any ``set_epoch`` call, and with ``warmup=0``, the full ε is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.data.noise import gaussian_noise
from smoothtransfer.objectives.adversarial import attack_mode
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput
from smoothtransfer.objectives.gaussian import check_count, check_real

# the reference clamps the smoothed probability at 1e-20 before the log
_PROB_FLOOR = 1e-20


def smoothed_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
    """−log of the soft smoothed classifier's probability of ``y``: ``x`` ``(B,C,H,W)``, ``noises``
    ``(m,B,C,H,W)`` -> ``(B,)``, ``−log(1/m Σ_i softmax(f(x+δ_i))_y)``."""
    m, B = noises.shape[:2]
    logits = model((x.unsqueeze(0) + noises).flatten(0, 1)).float().view(m, B, -1)
    p_bar = logits.softmax(-1).mean(0)  # (B,K)
    return F.nll_loss(p_bar.clamp_min(_PROB_FLOOR).log(), y, reduction="none")


@OBJECTIVES.register("smoothadv")
class SmoothAdvObjective(Objective):
    """Salman et al. (2019), SmoothAdv-PGD with m noise samples.

    Args:
        sigma: noise level σ in [0,1] pixel units (default 0.25).
        epsilon: L2 radius ε of the attack in [0,1] pixel units (default 0.5; the paper uses 0.25–2.0).
        steps: PGD steps T (default 2; the paper uses 1–10).
        m: noise samples per image, m_train in the paper (default 1; the paper uses 1, 2, 4, 8).
        step_size: PGD step α (default ``2ε_e/steps`` with ε_e the warmed-up radius, as the reference).
        warmup: epochs over which ε grows linearly to its final value (default 10; 0 = no warm-up).
        generator: optional ``torch.Generator`` (on the batch's device) for reproducible noise.

    The attack runs with the model in eval mode (as the reference), with each module's train/eval flag
    restored afterwards; see :func:`smoothtransfer.objectives.adversarial.attack_mode`. A step costs
    ``steps + 1`` forward passes (and ``steps + 1`` backward passes) of ``m·B`` images.
    Logs ``epsilon`` (the current ε_e) and ``adv_norm`` (mean ‖x' − x‖₂).
    """

    def __init__(self, sigma: float = 0.25, epsilon: float = 0.5, steps: int = 2, m: int = 1,
                 step_size: float | None = None, warmup: int = 10,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma = check_real("sigma", sigma)
        self.epsilon = check_real("epsilon", epsilon, positive=True)
        self.steps = check_count("steps", steps)
        self.m = check_count("m", m)
        self.step_size = None if step_size is None else check_real("step_size", step_size, positive=True)
        self.warmup = check_count("warmup", warmup, minimum=0)
        self.generator = generator
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each (0-based) epoch; drives the ε warm-up."""
        self.epoch = int(epoch)

    @property
    def current_epsilon(self) -> float:
        """ε_e = min(ε, (e+1)·ε/warmup) after ``set_epoch(e)``; ε without warm-up or before any call."""
        if self.epoch is None or self.warmup == 0:
            return self.epsilon
        return min(self.epsilon, (self.epoch + 1) * self.epsilon / self.warmup)

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, noises: torch.Tensor,
               epsilon: float | None = None) -> torch.Tensor:
        """SmoothAdv-PGD: x' ``(B,C,H,W)`` in [0,1], ``‖x' − x‖₂ ≤ ε`` per image, ascending
        :func:`smoothed_nll` for the fixed ``noises`` ``(m,B,C,H,W)``; ``epsilon`` defaults to ε_e."""
        eps = self.current_epsilon if epsilon is None else epsilon
        alpha = 2.0 * eps / self.steps if self.step_size is None else self.step_size
        x = x.detach()
        x_adv = x
        with attack_mode(model), torch.enable_grad():
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                # gradient w.r.t. the input only: the parameters' .grad are left untouched
                (grad,) = torch.autograd.grad(smoothed_nll(model, x_adv, y, noises).sum(), x_adv)
                grad_norm = grad.flatten(1).norm(dim=1)
                zero = grad_norm == 0  # saturated softmax: step in a random direction (reference)
                if zero.any():
                    grad = torch.where(zero.view(-1, 1, 1, 1), gaussian_noise(grad, 1.0, self.generator), grad)
                    grad_norm = grad.flatten(1).norm(dim=1)
                x_adv = x_adv.detach() + alpha * grad / grad_norm.view(-1, 1, 1, 1)
                # clamp to the image box, then project onto the ε-ball; scaling δ towards 0 keeps x' in [0,1]
                delta = (x_adv.clamp(0, 1) - x).renorm(p=2, dim=0, maxnorm=eps)
                x_adv = x + delta
        return x_adv.detach()

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the logits of ``x' + δ_1`` ``(B,K)``."""
        B = x.shape[0]
        noises = gaussian_noise(x.repeat(self.m, 1, 1, 1), self.sigma, generator=self.generator)
        noises = noises.view(self.m, *x.shape)  # (m,B,C,H,W), fixed for the attack and the update
        x_adv = self.attack(model, x, y, noises)
        logits = model((x_adv.unsqueeze(0) + noises).flatten(0, 1))  # (m*B,K), copy-major
        loss = F.cross_entropy(logits, y.repeat(self.m))
        logs = {"epsilon": self.current_epsilon, "adv_norm": (x_adv - x).flatten(1).norm(dim=1).mean().item()}
        return ObjectiveOutput(loss, logits[:B], logs)

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, epsilon={self.epsilon}, steps={self.steps}, m={self.m}, "
                f"step_size={self.step_size}, warmup={self.warmup}")
