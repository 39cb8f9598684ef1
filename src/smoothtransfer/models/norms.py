"""Normalisation layers that every convolutional backbone accepts (``norm_layer`` factories).

The mixed-noise transfer results show that BatchNorm statistics estimated on noisy pre-training data hurt
transfer to clean (or differently noised) data, so every CNN here takes any of these norms:

=========  ==================================================================================
batch      ``BatchNorm2d(C)`` (running statistics; behaves differently in train and eval mode)
group      ``GroupNorm(G, C)`` with G = 32, or the largest divisor of C that is at most 32
layer      ``GroupNorm(1, C)``: normalises over (C, H, W) per sample, the "LN" of the mixed-noise paper
instance   ``GroupNorm(C, C)``: per-sample, per-channel over (H, W), with a per-channel affine
=========  ==================================================================================

All but ``batch`` are per-sample, so a batch of noisy copies of one image (as in certification) is
normalised exactly as each copy alone would be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from smoothtransfer.registry import Registry

NormFactory = Callable[..., nn.Module]

NORMS: Registry[NormFactory] = Registry("norm")


def largest_group_divisor(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``max_groups`` (32 when C is a multiple)."""
    for g in range(min(max_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


# The factories are plain functions (not classes or lambdas stored as attributes) because timm's
# ``get_norm_layer`` accepts functions and calls them as ``norm_layer(C, device=..., dtype=...)``.
@NORMS.register("batch")
def batch_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.BatchNorm2d(num_channels, **factory_kwargs)


@NORMS.register("group")
def group_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(largest_group_divisor(num_channels), num_channels, **factory_kwargs)


@NORMS.register("layer")
def layer_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(1, num_channels, **factory_kwargs)


@NORMS.register("instance")
def instance_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(num_channels, num_channels, **factory_kwargs)


def get_norm_layer(norm: str) -> NormFactory:
    """The factory ``f(num_channels) -> nn.Module`` for ``norm`` (batch | group | layer | instance).

    Unknown names raise :class:`~smoothtransfer.errors.UserError` listing the choices.
    """
    return NORMS.get(norm)


def norm_names() -> list[str]:
    return NORMS.names()
