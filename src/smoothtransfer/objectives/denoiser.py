"""Training objectives for the denoisers themselves (not classifier objectives: not in ``OBJECTIVES``).

Each is a small callable ``objective(denoiser, x) -> (loss, logs)`` with ``x``: ``(B,C,H,W)`` clean images in
[0,1], ``loss`` a scalar tensor and ``logs`` a dict of floats.

* :class:`DDPMObjective` — the simplified DDPM loss of Ho et al. (2020), ``E_{t,ε} ‖ε − ε_θ(x_t, t)‖²`` with
  ``t ~ U{0..T−1}`` and ``x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε`` in [-1,1] space, for :class:`DiffusionDenoiser`.
* :class:`MSEDenoisingObjective` — Salman et al. (2020)'s MSE denoising loss ``‖D(x+δ, σ) − x‖²`` with
  ``δ ~ N(0,σ²I)`` and σ drawn per image from a set, for the σ-conditioned :class:`MSEDenoiser`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError


class DDPMObjective:
    """Noise-prediction (ε-MSE) loss of Ho et al. (2020) for a :class:`DiffusionDenoiser`'s UNet.

    Uses the denoiser's own scheduler for ``add_noise`` (and ``get_velocity`` for v-prediction UNets).
    """

    def __call__(self, denoiser: nn.Module, x: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``x``: ``(B,C,H,W)`` in [0,1]. Returns the mean-squared error on the UNet's prediction target."""
        unet, scheduler = denoiser.unet, denoiser.scheduler
        x0 = 2.0 * x.float() - 1.0  # the diffusion model works in [-1,1] (DESIGN rule 7)
        b = x0.shape[0]
        num_t = int(scheduler.config.num_train_timesteps)
        t = torch.randint(0, num_t, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, return_dict=False)[0]
        pred = pred[:, : x0.shape[1]]  # learned-variance UNets: the first C channels are ε
        kind = getattr(scheduler.config, "prediction_type", "epsilon")
        if kind == "epsilon":
            target = noise
        elif kind == "sample":
            target = x0
        elif kind == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            raise UserError(f"unsupported diffusion prediction_type '{kind}'")
        loss = F.mse_loss(pred.float(), target)
        return loss, {"loss": float(loss.detach())}


class MSEDenoisingObjective:
    """MSE denoising loss of Salman et al. (2020) for the σ-conditioned :class:`MSEDenoiser`.

    Args:
        sigmas: the noise levels (in [0,1] pixel units) to train for; each image draws one uniformly.
    """

    def __init__(self, sigmas: Sequence[float] = (0.25, 0.5, 1.0)) -> None:
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(not (s >= 0 and s < float("inf")) for s in sigmas):
            raise UserError(f"sigmas must be a non-empty list of finite values >= 0, got {sigmas}")
        self.sigmas = sigmas

    def __call__(self, denoiser: nn.Module, x: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``x``: ``(B,C,H,W)`` in [0,1]. Returns ``mean ‖D(x+δ, σ_b) − x‖²`` over pixels and images."""
        b = x.shape[0]
        table = torch.tensor(self.sigmas, dtype=torch.float32, device=x.device)
        sigma = table[torch.randint(0, len(self.sigmas), (b,), device=x.device, generator=generator)]
        # Noise in float32 in [0,1] pixel space (DESIGN rules 1 and 6).
        delta = torch.randn(x.shape, device=x.device, generator=generator) * sigma.view(b, 1, 1, 1)
        est = denoiser(x.float() + delta, sigma, clamp=False)
        loss = F.mse_loss(est.float(), x.float())
        return loss, {"loss": float(loss.detach())}


def denoiser_objective(kind: str, sigmas: Sequence[float] = (0.25, 0.5, 1.0)):
    """The training objective for a denoiser of ``kind`` (``diffusion`` or ``mse``)."""
    if kind == "diffusion":
        return DDPMObjective()
    if kind == "mse":
        return MSEDenoisingObjective(sigmas)
    raise UserError(f"unknown denoiser kind '{kind}'; choose from: diffusion, mse")
