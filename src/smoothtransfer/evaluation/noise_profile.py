"""Base-classifier accuracy under Gaussian input noise, per noise level.

Reproduces the comparison of "A Study of the Effects of Transfer Learning on Adversarial Robustness"
(Table 2): an adversarially trained model and a Gaussian/consistency-trained one can have similar clean
accuracy while one collapses under noise levels the other tolerates, which is what decides how well each
smooths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.attacks import check_classifier, check_pos_int, device_of, iter_batches

#: The noise levels of the paper's Table 2 (sigma in [0,1] pixel units).
DEFAULT_SIGMAS = (0.001, 0.01, 0.1, 0.25, 0.5, 1.0)


def check_sigmas(sigmas) -> tuple[float, ...]:
    """Validate a non-empty list of finite noise levels ``>= 0`` (duplicates removed, order kept)."""
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise UserError(f"sigmas must be numbers, got {sigmas!r}") from None
    if not values:
        raise UserError("give at least one noise level sigma")
    bad = [s for s in values if not (math.isfinite(s) and s >= 0)]
    if bad:
        raise UserError(f"every sigma must be a finite number >= 0, got {bad[0]}")
    return tuple(dict.fromkeys(values))


@torch.no_grad()
def noise_profile(
    model: nn.Module,
    dataset,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    indices: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> dict[float, float]:
    """Accuracy of ``argmax model(x + delta)``, ``delta ~ N(0, sigma^2 I)`` in pixel space, for each sigma.

    ``dataset``: ``__getitem__ -> (x (C,H,W) in [0,1], y)`` (``indices`` selects images) or an iterable of
    ``(x (B,C,H,W), y (B,))`` batches. Noise is drawn in float32 from ``generator`` (any device; moved to the
    model's) and added without clipping, exactly as the smoothed classifier sees it (soundness rule 1); one
    independent draw per image and sigma. The model runs in eval mode; its flags are restored.

    Returns ``{sigma: accuracy}`` in the order given (``sigma=0`` gives the clean accuracy).
    """
    sigmas = check_sigmas(sigmas)
    batch_size = check_pos_int(batch_size, "batch_size")
    info = getattr(dataset, "info", None)
    check_classifier(model, num_classes if num_classes is not None else getattr(info, "num_classes", None))
    device = device_of(model)
    correct = dict.fromkeys(sigmas, 0)
    total = 0
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for x, y in iter_batches(dataset, batch_size, indices, device):
            for s in sigmas:
                gdev = generator.device if generator is not None else device
                noise = torch.randn(x.shape, generator=generator, device=gdev, dtype=torch.float32).to(device)
                pred = model(x + s * noise).argmax(1)
                correct[s] += int((pred == y).sum())
            total += x.shape[0]
    finally:
        for m, flag in flags:
            m.training = flag
    if total == 0:
        raise UserError("no images to evaluate")
    return {s: correct[s] / total for s in sigmas}


def markdown_table(profile: dict[float, float], name: str = "accuracy") -> str:
    """``| sigma | 0.001 | ... |`` over ``| name | 93.1 | ... |`` (accuracy in percent)."""
    head = "| σ | " + " | ".join(f"{s:g}" for s in profile) + " |"
    sep = "|---|" + "---|" * len(profile)
    row = f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in profile.values()) + " |"
    return "\n".join((head, sep, row))
