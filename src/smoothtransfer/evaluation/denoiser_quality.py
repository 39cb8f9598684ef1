"""How well a denoiser removes the smoothing noise: PSNR of its output against the clean image, per σ.

Denoised smoothing (Salman et al. 2020; Carlini et al. 2023) only certifies well when the denoiser returns
images the off-the-shelf classifier still recognises, so a user needs the denoiser's quality at each σ the
smoothed classifier will use, beside the noisy input's own PSNR (the gain is what the denoiser contributes).

PSNR is ``10·log10(1 / MSE)`` for images in [0,1], computed per image and averaged over images (the
convention of the denoising literature; the mean of per-image PSNR, not the PSNR of the mean MSE). The noise
is drawn exactly as the smoothed classifier draws it: float32, in pixel space, not clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from smoothtransfer.data.noise import gaussian_noise
from smoothtransfer.evaluation.attacks import check_pos_int, device_of, iter_batches
from smoothtransfer.evaluation.noise_profile import check_sigmas

#: the file a trained denoiser's PSNR per σ is kept in, beside its weights (``train.denoiser.measure_psnr``)
PSNR_FILE = "psnr.json"
#: floor on the per-image MSE: a pixel-exact output would give an infinite PSNR (capped at 100 dB)
_MIN_MSE = 1e-10


@dataclass(frozen=True)
class PSNR:
    """PSNR (dB) at one σ, averaged over ``images`` images."""

    sigma: float
    denoised: float  # PSNR of D(x + δ, σ) against x
    noisy: float  # PSNR of the (unclipped) noisy input x + δ against x: ≈ −20·log10(σ)
    images: int

    @property
    def gain(self) -> float:
        """dB the denoiser adds over its input."""
        return self.denoised - self.noisy


def psnr_per_image(estimate: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``(B,C,H,W), (B,C,H,W) -> (B,)`` PSNR in dB of each estimate against its clean image (range [0,1])."""
    if estimate.shape != clean.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and clean {tuple(clean.shape)} differ in shape")
    mse = (estimate.float() - clean.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(_MIN_MSE))


@torch.no_grad()
def denoiser_psnr(
    denoiser: nn.Module,
    dataset,
    sigmas: Sequence[float],
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    indices: Sequence[int] | None = None,
) -> list[PSNR]:
    """PSNR of ``denoiser(x + δ, σ)`` against ``x`` for each σ, with ``δ ~ N(0, σ²I)`` in float32.

    ``denoiser``: ``forward(x_noisy (B,C,H,W), sigma) -> (B,C,H,W)`` in [0,1] (``models.denoisers``).
    ``dataset``: ``__getitem__ -> (x (C,H,W) in [0,1], y)`` (``indices`` selects images) or an iterable of
    ``(x (B,C,H,W), y)`` batches. One independent noise draw per image and σ from ``generator`` (any device;
    moved to the denoiser's). The denoiser runs in eval mode; its mode is restored.

    Returns one :class:`PSNR` per σ, in the order given.
    """
    sigmas = check_sigmas(sigmas)
    batch_size = check_pos_int(batch_size, "batch_size")
    device = device_of(denoiser)
    noise_device = generator.device if generator is not None else device
    was_training = denoiser.training
    denoiser.eval()
    sums = {s: [0.0, 0.0] for s in sigmas}
    count = 0
    try:
        for x, _ in iter_batches(dataset, batch_size, indices, device):
            x = x.to(dtype=torch.float32)
            for s in sigmas:
                shape_like = torch.empty(x.shape, device=noise_device)  # the draw happens on the generator's device
                noisy = x + gaussian_noise(shape_like, s, generator).to(device)
                sums[s][0] += float(psnr_per_image(denoiser(noisy, s), x).sum())
                sums[s][1] += float(psnr_per_image(noisy, x).sum())
            count += x.shape[0]
    finally:
        denoiser.train(was_training)
    if count == 0:
        raise ValueError("no images to evaluate the denoiser on")
    return [PSNR(sigma=s, denoised=sums[s][0] / count, noisy=sums[s][1] / count, images=count) for s in sigmas]


def psnr_table(results: Sequence[PSNR]) -> str:
    """A markdown table of :func:`denoiser_psnr` results (σ, noisy input, denoised, gain)."""
    lines = ["| σ | noisy input PSNR (dB) | denoised PSNR (dB) | gain (dB) |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.sigma:g} | {r.noisy:.2f} | {r.denoised:.2f} | {r.gain:+.2f} |")
    n = results[0].images if results else 0
    return "\n".join(lines) + f"\n(mean over {n} images)\n"


def expected_noisy_psnr(sigma: float) -> float:
    """The PSNR of unclipped Gaussian noise of std σ on a [0,1] image: ``−20·log10(σ)`` (for checks)."""
    return -20.0 * math.log10(sigma)
