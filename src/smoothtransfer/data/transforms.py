"""Batched training augmentations in [0,1] pixel space, on whatever device the batch lives on.

Augmentations run on whole batches (no per-image Python loop, no DataLoader workers), so they are cheap
on the GPU. Each is registered in :data:`TRAIN_AUGMENTS` as ``fn(x (B,C,H,W), generator=None) -> (B,C,H,W)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from smoothtransfer.errors import UserError
from smoothtransfer.registry import Registry

TRAIN_AUGMENTS: Registry[Callable[..., torch.Tensor]] = Registry("train augmentation")


def _rand_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    # Random numbers must be drawn on the generator's device; they are moved to x's device afterwards.
    return generator.device if generator is not None else x.device


def random_crop_flip(x: torch.Tensor, padding: int = 4,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, independently per image (CIFAR-style).

    Args:
        x: ``(B,C,H,W)`` images (any dtype, any device).
        padding: zero padding on each side; the crop offset is uniform in ``[0, 2*padding]`` per axis.
        generator: optional ``torch.Generator`` for reproducible draws (on CPU or on x's device).

    Returns:
        ``(B,C,H,W)``, same dtype and device as ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects (B,C,H,W), got shape {tuple(x.shape)}")
    if padding < 0:
        raise UserError(f"crop padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    dev = _rand_device(x, generator)
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=dev).to(x.device)
    flip = torch.randint(0, 2, (b,), generator=generator, device=dev).to(x.device).bool()
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B,H) rows of the padded image to keep
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B,W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # reading columns backwards = horizontal flip
    # One gather per axis: index H with rows, then W with cols; both are broadcast over channels.
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def identity(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """No augmentation: returns ``x`` ``(B,C,H,W)`` unchanged."""
    return x


TRAIN_AUGMENTS.register("none", identity)
TRAIN_AUGMENTS.register("crop_flip", random_crop_flip)

__all__ = ["TRAIN_AUGMENTS", "identity", "random_crop_flip"]
