"""FT-CADIS: confidence-aware denoised fine-tuning of an off-the-shelf classifier (Jang, Kim, Shin & Jeong,
"Confidence-aware Denoised Fine-tuning of Off-the-shelf Models for Certified Robustness", Algorithm 1).

The classifier ``f`` is fine-tuned on denoised images ``x̂_i = D(x + δ_i)``, ``δ_i ~ N(0,σ²I)``, i = 1..M, from a
frozen denoiser ``D`` (the one-shot diffusion denoiser of Carlini et al. 2023, or any ``D(x_noisy, σ)``):

* Confidence-aware selective cross-entropy: with the non-hallucinated set ``D_nh = {i : argmax f(x̂_i) = y}``
  (recomputed every step with the current classifier),
  ``L_SCE = (1/M) Σ_{i ∈ D_nh} CE(f(x̂_i), y)``; when ``D_nh`` is empty, the copy with the lowest CE alone
  (still divided by M) is used, so every example contributes (the reference code's ``warm_start``).
* Confidence-aware masked adversarial loss: with ``η_i = x̂_i − x`` and the consistent target
  ``ŷ = (1/M) Σ_i softmax f(x̂_i)``, ``η_i*`` maximises ``KL(ŷ ‖ softmax f(x + η))`` by T steps of L2-PGD
  (step 2ε/T, normalised gradient) started at ``η_i`` and projected onto ``‖η − η_i‖₂ ≤ ε``;
  ``L_MAdv = 1[|D_nh| = M] · max_i KL(ŷ ‖ softmax f(x + η_i*))`` per example.
* ``L = L_SCE + λ·L_MAdv``, averaged over the batch.

Notes on units and on the reference implementation:
* ε is in [0,1] pixel units, like σ. The paper states ε = 0.25, but the authors' code (``train.py``:
  ``--eps 64``, divided by 256) applies it to [-1,1]-scaled images (the denoiser's range), where 0.25 is
  0.125 in [0,1] pixels; the default ``epsilon=0.125`` is that effective radius.
* ε doubles after 10 epochs at σ = 1.0 only (paper, App. on CIFAR-10 settings; the code's ``--eps_double
  --warmup_eps 10``: the attack radius is 2ε from 0-based epoch 10 on). The trainer calls
  :meth:`FTCADISObjective.set_epoch` at the start of every epoch; ``eps_double_epoch`` sets the epoch
  ("auto": 10 when σ = 1.0, never otherwise; None: never). The PGD step stays 2ε_e/T.
* The attack perturbs ``η`` directly, so no gradient ever needs to pass through ``D``: the denoiser runs under
  ``torch.no_grad`` here (its parameters are frozen in any case).
* As in the reference code, the attack runs with the classifier in eval mode (BatchNorm statistics untouched)
  and ``ŷ`` is *not* detached in the final loss (``detach_target=True`` detaches it). The reference code also
  re-standardises η after each PGD step to the mean/RMS of η_i; that is off by default (it can leave the
  ε-ball) and on with ``match_noise_stats=True``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.denoisers import load_denoiser
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput

# λ of the paper for σ = 0.25 / 0.5 / 1.0 is 1 / 2 / 4, i.e. λ = 4σ; used when lbd is None.
_LBD_PER_SIGMA = 4.0
# CIFAR-10, σ = 1.0: the attack radius doubles from this (0-based) epoch on (paper; code --warmup_eps 10)
_EPS_DOUBLE_EPOCH = 10


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over all but the first dim, shaped to broadcast: ``(N, ...) -> (N, 1, ..., 1)``."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


@OBJECTIVES.register("ftcadis")
class FTCADISObjective(Objective):
    """FT-CADIS (Algorithm 1). ``forward(model, x (B,C,H,W) in [0,1], y (B,)) -> ObjectiveOutput``.

    Args:
        denoiser: frozen ``D(x_noisy (B,C,H,W), sigma) -> (B,C,H,W)`` in [0,1] (a module or a directory that
            :func:`smoothtransfer.models.denoisers.load_denoiser` reads). Kept outside this module's parameters
            and state dict: it is neither trained nor checkpointed with the objective.
        sigma: smoothing noise level in [0,1] pixel units.
        m: number of noisy copies M per image.
        steps: PGD steps T of the masked adversarial loss.
        epsilon: L2 radius of the PGD ball around each η_i in [0,1] pixel units (0.125 = the reference code's
            effective radius, see the module notes).
        eps_double_epoch: 0-based epoch from which the radius is 2·epsilon; "auto" → 10 at σ = 1.0 (the
            paper's CIFAR-10 schedule), never at other σ; None → never.
        lbd: λ, the weight of L_MAdv; None → 4σ (the paper's 1/2/4 for σ = 0.25/0.5/1.0).
        use_mask: False → L_MAdv on every example (ablation "w/o mask", Table 3).
        use_nh: False → CE on all M denoised images (ablation "w/o non-hallucinated condition").
        warm_start: if D_nh is empty, train on the lowest-CE copy (True, as in the paper's fine-tuning).
        detach_target: detach ŷ in L_MAdv (False, as in the reference code).
        match_noise_stats: the reference code's per-step re-standardisation of η (see module notes).
    """

    def __init__(self, denoiser: nn.Module | str | os.PathLike | None = None, sigma: float = 0.25, m: int = 4,
                 steps: int = 4, epsilon: float = 0.125, lbd: float | None = None, use_mask: bool = True,
                 use_nh: bool = True, warm_start: bool = True, detach_target: bool = False,
                 match_noise_stats: bool = False, eps_double_epoch: int | str | None = "auto") -> None:
        super().__init__()
        if denoiser is None:
            raise UserError("objective ftcadis needs a denoiser (a denoiser directory or module)")
        if isinstance(denoiser, (str, os.PathLike)):
            denoiser = load_denoiser(denoiser)
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise UserError(f"ftcadis: sigma must be > 0, got {sigma}")
        if hasattr(denoiser, "timestep_for_sigma"):
            denoiser.timestep_for_sigma(sigma)  # UserError now if σ is outside the diffusion schedule
        if int(m) != m or m < 1:
            raise UserError(f"ftcadis: m (noisy copies) must be an integer >= 1, got {m}")
        if int(steps) != steps or steps < 0:
            raise UserError(f"ftcadis: steps must be an integer >= 0, got {steps}")
        if not math.isfinite(float(epsilon)) or epsilon < 0:
            raise UserError(f"ftcadis: epsilon must be >= 0, got {epsilon}")
        if eps_double_epoch == "auto":
            eps_double_epoch = _EPS_DOUBLE_EPOCH if math.isclose(sigma, 1.0) else None
        elif eps_double_epoch is not None and (isinstance(eps_double_epoch, bool) or not isinstance(
                eps_double_epoch, int) or eps_double_epoch < 0):
            raise UserError(f"ftcadis: eps_double_epoch must be 'auto', null or an epoch >= 0, got "
                            f"{eps_double_epoch!r}")
        lbd = _LBD_PER_SIGMA * sigma if lbd is None else float(lbd)
        if not math.isfinite(lbd) or lbd < 0:
            raise UserError(f"ftcadis: lbd must be >= 0, got {lbd}")
        if isinstance(denoiser, nn.Module):
            denoiser.requires_grad_(False).eval()
        # Not a registered submodule: keeps D out of parameters(), state_dict(), DDP and .train().
        object.__setattr__(self, "denoiser", denoiser)
        self.sigma, self.m, self.steps, self.epsilon, self.lbd = sigma, int(m), int(steps), float(epsilon), lbd
        self.use_mask, self.use_nh, self.warm_start = bool(use_mask), bool(use_nh), bool(warm_start)
        self.detach_target, self.match_noise_stats = bool(detach_target), bool(match_noise_stats)
        self.eps_double_epoch: int | None = eps_double_epoch
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each (0-based) epoch; drives the ε doubling."""
        self.epoch = int(epoch)

    @property
    def current_epsilon(self) -> float:
        """2ε from epoch ``eps_double_epoch`` on, else ε (also before any :meth:`set_epoch` call)."""
        if self.eps_double_epoch is not None and self.epoch is not None and self.epoch >= self.eps_double_epoch:
            return 2.0 * self.epsilon
        return self.epsilon

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, m={self.m}, steps={self.steps}, epsilon={self.epsilon}, "
                f"eps_double_epoch={self.eps_double_epoch}, lbd={self.lbd}, use_mask={self.use_mask}, "
                f"use_nh={self.use_nh}, warm_start={self.warm_start}")

    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """M noisy copies and their denoised versions: ``(B,C,H,W) -> (M,B,C,H,W)`` in [0,1], no grad."""
        d = self.denoiser
        if isinstance(d, nn.Module):
            t = next(iter(d.parameters()), None)
            t = next(iter(d.buffers()), None) if t is None else t
            if t is not None and t.device != x.device:
                d.to(x.device)  # the trainer moves the objective; D is not a submodule, so follow x here
            d.eval()  # stays deterministic (dropout off) even after objective.train()
        b = x.shape[0]
        xr = x.float().unsqueeze(0).expand(self.m, *x.shape).reshape(self.m * b, *x.shape[1:])
        noisy = xr + torch.randn_like(xr) * self.sigma  # float32 noise in pixel space (rules 1, 6)
        return d(noisy, self.sigma).float().view(self.m, *x.shape)

    def attack(self, model: nn.Module, x: torch.Tensor, eta0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L2-PGD on the denoising residuals (Algorithm 1, the inner max of L_MAdv).

        ``x``: ``(A,C,H,W)``; ``eta0``: ``(M,A,C,H,W)`` = x̂_i − x; ``target``: ``(A,K)`` = ŷ (a constant).
        Maximises ``Σ_i KL(ŷ ‖ softmax f(x + η_i))`` for ``steps`` steps of size ``2ε/T`` along the per-copy
        normalised gradient, projecting each ``η_i`` onto ``‖η − η_i‖₂ ≤ ε`` (ε = :attr:`current_epsilon`,
        doubled after ``eps_double_epoch``). Returns ``η*`` ``(M,A,C,H,W)``,
        detached. The classifier runs in eval mode with frozen parameters and is restored afterwards.
        """
        m, a = eta0.shape[:2]
        eta0 = eta0.detach()
        eps = self.current_epsilon
        if self.steps == 0 or eps == 0 or a == 0:
            return eta0.clone()
        target = target.detach().float().unsqueeze(0).expand(m, *target.shape).reshape(m * a, -1)
        xr = x.detach().unsqueeze(0)
        alpha = 2.0 * eps / self.steps
        if self.match_noise_stats:
            flat0 = eta0.flatten(2)
            mu0 = flat0.mean(-1).view(m, a, 1, 1, 1)
            rms0 = flat0.pow(2).mean(-1).sqrt().view(m, a, 1, 1, 1)
        was_training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)  # only ∂/∂η is needed; skip weight gradients
        try:
            eta = eta0.clone()
            for _ in range(self.steps):
                eta.requires_grad_(True)
                with torch.enable_grad():
                    logits = model((xr + eta).reshape(m * a, *x.shape[1:])).float()
                    kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")
                    (grad,) = torch.autograd.grad(kl, [eta])
                grad = grad.reshape(m * a, *x.shape[1:])
                grad = (grad / (_per_sample_norm(grad) + 1e-12)).view_as(eta)
                diff = (eta.detach() + alpha * grad) - eta0
                dflat = diff.reshape(m * a, *x.shape[1:])
                scale = (eps / (_per_sample_norm(dflat) + 1e-12)).clamp(max=1.0)
                eta = eta0 + (dflat * scale).view_as(eta0)
                if self.match_noise_stats:
                    flat = eta.flatten(2)
                    mu = flat.mean(-1).view(m, a, 1, 1, 1)
                    rms = flat.pow(2).mean(-1).sqrt().view(m, a, 1, 1, 1)
                    eta = mu0 + (eta - mu) / (rms + 1e-12) * rms0
                eta = eta.detach()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)
        return eta

    # ------------------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        """``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)``. Logits returned: those of the first denoised copy."""
        m, b = self.m, x.shape[0]
        den = self.denoise(x)  # (M,B,C,H,W)
        logits0 = model(den.reshape(m * b, *x.shape[1:]))  # (M·B, K), train mode, grads to f
        k = logits0.shape[1]
        yr = y.repeat(m)
        ce = F.cross_entropy(logits0.float(), yr, reduction="none").view(m, b).t()  # (B,M)
        correct = (logits0.detach().argmax(1) == yr).view(m, b).t()  # (B,M): i ∈ D_nh
        # -- L_SCE: CE on the non-hallucinated copies, normalised by M ----------------------------------
        sel = correct.clone() if self.use_nh else torch.ones_like(correct)
        if self.warm_start:
            empty = ~sel.any(dim=1)
            if empty.any():  # cold start: the single lowest-CE copy of each example with D_nh = ∅
                rows = empty.nonzero(as_tuple=True)[0]
                sel[rows, ce.detach()[rows].argmin(dim=1)] = True
        l_sce = (ce * sel).sum(dim=1) / m  # (B,)
        # -- L_MAdv: only for examples whose M copies are all non-hallucinated ----------------------------
        l_madv = torch.zeros(b, device=x.device, dtype=l_sce.dtype)
        mask = correct.all(dim=1) if self.use_mask else torch.ones(b, dtype=torch.bool, device=x.device)
        active = mask.nonzero(as_tuple=True)[0]
        if self.lbd > 0 and len(active) > 0:
            probs = F.softmax(logits0.float(), dim=1).view(m, b, k)
            y_hat = probs[:, active].mean(dim=0)  # (A,K) consistent target ŷ
            xa = x[active].float()
            eta0 = den[:, active] - xa.unsqueeze(0)  # (M,A,C,H,W)
            eta = self.attack(model, xa, eta0, y_hat)
            adv_logits = model((xa.unsqueeze(0) + eta).reshape(m * len(active), *x.shape[1:])).float()
            tgt = y_hat.detach() if self.detach_target else y_hat
            tgt = tgt.unsqueeze(0).expand(m, *tgt.shape).reshape(m * len(active), k)
            kl = F.kl_div(F.log_softmax(adv_logits, dim=1), tgt, reduction="none").sum(dim=1)
            l_madv = l_madv.index_put((active,), kl.view(m, len(active)).max(dim=0).values)
        loss = (l_sce + self.lbd * l_madv).mean()
        logs = {
            "nh_fraction": float(correct.float().mean()),
            "l_sce": float(l_sce.detach().mean()),
            "l_madv": float(l_madv.detach().mean()),
            "madv_active": float(mask.float().mean()),
        }
        return ObjectiveOutput(loss, logits0[:b], logs)
