"""Consistency regularisation (Jeong & Shin, "Consistency Regularization for Certified Robustness of
Smoothed Classifiers", NeurIPS 2020), in the form of the authors' reference implementation
(github.com/jh-jeong/smoothing-consistency, ``consistency_loss(..., loss='default')``):

    L = 1/m Σ_i CE(f(x+δ_i), y) + λ · 1/m Σ_i KL(p̂ ‖ p_i) + η · H(p̂),   p_i = softmax f(x+δ_i),  p̂ = 1/m Σ_i p_i

averaged over the batch. The target p̂ of the KL term is *not* detached (as in the reference), and the
entropy term is that of the mean prediction p̂. The reference spends the same compute per step by splitting
each batch into m chunks; here every image of the batch gets m noisy copies, so a step costs m forward
passes of the batch (use a batch m times smaller to match the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput
from smoothtransfer.objectives.gaussian import check_count, check_real, noisy_copies

# the reference clamps probabilities at 1e-20 before the log of the entropy term
_PROB_FLOOR = 1e-20


def consistency_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits``: ``(m,B,K)`` of m noisy copies -> ``(KL, H)``, each ``(B,)``:
    ``KL = 1/m Σ_i KL(p̂ ‖ p_i)`` and ``H = H(p̂)`` with ``p̂`` the mean softmax over the copies."""
    log_p = logits.log_softmax(-1)  # (m,B,K)
    p_bar = log_p.exp().mean(0)  # (B,K)
    # KL(p̂ ‖ p_i) = Σ_k p̂ (log p̂ − log p_i); equals F.kl_div(log_p_i, p̂).sum(-1) of the reference, but the
    # floor inside the log keeps the gradient finite if a class probability underflows to exactly 0
    log_p_bar = p_bar.clamp_min(_PROB_FLOOR).log()
    kl = (p_bar * (log_p_bar - log_p)).sum(-1).mean(0)
    entropy = -(p_bar * log_p_bar).sum(-1)
    return kl, entropy


@OBJECTIVES.register("consistency")
class ConsistencyObjective(Objective):
    """Jeong & Shin (2020): Gaussian augmentation with m copies + KL-to-the-mean + entropy of the mean.

    Args:
        sigma: noise level σ in [0,1] pixel units (default 0.5).
        m: noisy copies per image, ``>= 2`` (default 2, as in the paper).
        lbd: λ, weight of the consistency (KL) term (default 5; the paper uses 5–20 on CIFAR-10).
        eta: η, weight of the entropy term (default 0.5, the reference default).
        generator: optional ``torch.Generator`` (on the batch's device) for reproducible noise.

    Logs ``loss_ce``, ``loss_kl`` and ``entropy`` (batch means, before weighting).
    """

    def __init__(self, sigma: float = 0.5, m: int = 2, lbd: float = 5.0, eta: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.sigma = check_real("sigma", sigma)
        # with one copy the KL term is identically zero: not consistency regularisation
        self.m = check_count("m", m, minimum=2)
        self.lbd = check_real("lbd", lbd)
        self.eta = check_real("eta", eta)
        self.generator = generator

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Returns the first noisy copy's logits ``(B,K)``."""
        B = x.shape[0]
        logits = model(noisy_copies(x, self.sigma, self.m, self.generator))  # (m*B,K), copy-major
        loss_ce = F.cross_entropy(logits, y.repeat(self.m))
        logits = logits.view(self.m, B, -1)
        kl, entropy = consistency_terms(logits.float())
        loss = loss_ce + (self.lbd * kl + self.eta * entropy).mean()
        logs = {"loss_ce": loss_ce.item(), "loss_kl": kl.mean().item(), "entropy": entropy.mean().item()}
        return ObjectiveOutput(loss, logits[0], logs)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, m={self.m}, lbd={self.lbd}, eta={self.eta}"
