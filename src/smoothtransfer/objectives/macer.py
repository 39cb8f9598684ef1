"""MACER (Zhai et al., "MACER: Attack-free and Scalable Robust Training via Maximizing Certified Radius",
ICLR 2020), in the form of the authors' reference implementation (github.com/RuntianZ/macer, ``macer.py``).

With k noise draws per image, ``p̂ = 1/k Σ_j softmax(f(x+δ_j))`` is the soft smoothed classifier and
``p̂^β`` the same with the logits multiplied by the inverse temperature β. The loss is

    L = 1/B Σ_b [ −log(p̂_y + 1e-10)  +  λ · (σ/2) · 1[b ∈ G] · (γ − ξ_b) ],
    ξ_b = Φ⁻¹(p̂^β_(1)) − Φ⁻¹(p̂^β_(2)),

where p̂^β_(1) ≥ p̂^β_(2) are the two largest entries of p̂^β and G holds the samples whose top class under
p̂^β is y (correctly classified) and whose margin is finite and in the hinge region, ``|ξ| ≤ γ``. σ/2 · ξ
is the certified-radius surrogate, so the second term is the hinge ``max(0, γ − ξ)`` on it.

Infinite Φ⁻¹: where a probability saturates to 1 or 0 in floating point, ξ = +∞ and the hinge is exactly 0;
the reference excludes those samples (its ``isinf``/``isnan`` filter) instead of clamping, and so does this
code. Φ⁻¹ is evaluated, inside the graph, only on the samples in G, so no ∞·0 = NaN reaches the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput
from smoothtransfer.objectives.gaussian import check_count, check_real, noisy_copies

# the reference adds 1e-10 inside the log of the classification loss ("avoid nan")
_LOG_EPS = 1e-10


def macer_terms(logits: torch.Tensor, y: torch.Tensor, sigma: float, gamma: float, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two MACER terms per sample, from the logits of k noisy copies.

    Args:
        logits: ``(k,B,K)``, ``f(x+δ_j)`` for j = 1..k; ``y``: ``(B,)``.
    Returns:
        ``loss_cls`` ``(B,)``: ``−log(p̂_y + 1e-10)``;
        ``loss_robust`` ``(B,)``: ``(σ/2)·(γ − ξ)`` on the hinge set G, 0 elsewhere;
        ``in_hinge`` ``(B,)`` bool: membership of G.
    """
    logits = logits.float()  # Φ⁻¹ near 0 and 1 needs float32 even under autocast
    p_bar = logits.softmax(-1).mean(0)  # (B,K)
    loss_cls = F.nll_loss((p_bar + _LOG_EPS).log(), y, reduction="none")
    p_beta = (beta * logits).softmax(-1).mean(0)  # β only enters the robustness term
    top2, top2_idx = p_beta.topk(2, dim=-1)  # (B,2)
    with torch.no_grad():
        xi = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
        in_hinge = (top2_idx[:, 0] == y) & torch.isfinite(xi) & (xi.abs() <= gamma)
    loss_robust = torch.zeros_like(loss_cls)
    if in_hinge.any():
        p1, p2 = top2[in_hinge, 0], top2[in_hinge, 1]
        xi_g = torch.special.ndtri(p1) - torch.special.ndtri(p2)
        loss_robust = loss_robust.masked_scatter(in_hinge, sigma / 2 * (gamma - xi_g))
    return loss_cls, loss_robust, in_hinge


@OBJECTIVES.register("macer")
class MACERObjective(Objective):
    """Zhai et al. (2020): soft-smoothed cross-entropy + λ · certified-radius hinge, attack-free.

    Args:
        sigma: noise level σ in [0,1] pixel units (default 0.25).
        num_noise: k, noise draws per image (default 16, the paper's CIFAR-10 setting).
        lbd: λ, weight of the robustness term (default 12, the paper's value for σ = 0.25 on CIFAR-10).
        gamma: γ, the hinge threshold on ξ (default 8).
        beta: β, inverse temperature of the logits in the robustness term (default 16).
        generator: optional ``torch.Generator`` (on the batch's device) for reproducible noise.

    A step costs k forward/backward passes of the batch (the paper uses batch 64 with k = 16).
    Logs ``loss_ce``, ``loss_robust`` (batch means, before λ) and ``hinge_fraction`` (|G| / B).
    """

    def __init__(self, sigma: float = 0.25, num_noise: int = 16, lbd: float = 12.0, gamma: float = 8.0,
                 beta: float = 16.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma = check_real("sigma", sigma, positive=True)  # the radius surrogate is σ/2·ξ: σ=0 is void
        self.num_noise = check_count("num_noise", num_noise)
        self.lbd = check_real("lbd", lbd)
        self.gamma = check_real("gamma", gamma, positive=True)
        self.beta = check_real("beta", beta, positive=True)
        self.generator = generator

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the first noisy copy's logits ``(B,K)``."""
        B = x.shape[0]
        logits = model(noisy_copies(x, self.sigma, self.num_noise, self.generator)).view(self.num_noise, B, -1)
        loss_cls, loss_robust, in_hinge = macer_terms(logits, y, self.sigma, self.gamma, self.beta)
        # the reference sums both terms over the batch and divides by B
        loss = loss_cls.mean() + self.lbd * loss_robust.mean()
        logs = {"loss_ce": loss_cls.mean().item(), "loss_robust": loss_robust.mean().item(),
                "hinge_fraction": in_hinge.float().mean().item()}
        return ObjectiveOutput(loss, logits[0], logs)

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, num_noise={self.num_noise}, lbd={self.lbd}, gamma={self.gamma}, "
                f"beta={self.beta}")
