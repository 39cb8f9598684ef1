"""Normalisation layers that every convolutional backbone accepts (``norm_layer`` factories).

The mixed-noise transfer results show that BatchNorm statistics estimated on noisy pre-training data hurt
transfer to clean (or differently noised) data, so every CNN here takes any of these norms:

=========  ==================================================================================
batch      ``BatchNorm2d(C)`` (running statistics; behaves differently in train and eval mode)
group      ``GroupNorm(G, C)``, G = the largest divisor of C that is at most min(32, C // 4): at least
           4 channels per group on narrow layers, 32 groups on wide ones (rule ``"c4"``, below)
layer      ``GroupNorm(1, C)``: normalises over (C, H, W) per sample, the "LN" of the mixed-noise paper
instance   ``GroupNorm(C, C)``: per-sample, per-channel over (H, W), with a per-channel affine
=========  ==================================================================================

All but ``batch`` are per-sample, so a batch of noisy copies of one image (as in certification) is
normalised exactly as each copy alone would be.

Group rules (``GROUP_RULES``; the model spec records the rule of every ``group`` model in
``spec["kwargs"]["group_rule"]`` and the resulting groups per width in ``spec["norm_groups"]``):

==========  =============================================================================================
``c4``      (default) largest divisor of C that is <= min(32, C // 4): C = 16/32/64 (CIFAR ResNet stages)
            → 4/8/16 groups of 4 channels; C >= 128 → 32 groups (the usual GN of Wu & He, 2018)
``max32``   the rule before it: largest divisor of C that is <= 32. On the 16/32-channel stages of the
            CIFAR ResNets that is one channel per group, i.e. InstanceNorm; kept only so that
            checkpoints written with it (their spec has no ``group_rule``) rebuild exactly as trained
==========  =============================================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.registry import Registry

NormFactory = Callable[..., nn.Module]

NORMS: Registry[NormFactory] = Registry("norm")

#: the rule a new ``group`` model uses, and the one a spec without ``group_rule`` was built with
DEFAULT_GROUP_RULE = "c4"
LEGACY_GROUP_RULE = "max32"


def largest_group_divisor(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``max_groups`` (32 when C is a multiple)."""
    for g in range(min(max_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def _groups_c4(num_channels: int) -> int:
    return largest_group_divisor(num_channels, max(1, min(32, num_channels // 4)))


#: rule name → ``f(num_channels) -> num_groups`` (see the module docstring)
GROUP_RULES: dict[str, Callable[[int], int]] = {
    "c4": _groups_c4,
    "max32": largest_group_divisor,
}


def group_norm_groups(num_channels: int, rule: str = DEFAULT_GROUP_RULE) -> int:
    """The number of groups a ``group`` norm over ``num_channels`` channels has under ``rule``."""
    return GROUP_RULES[check_group_rule(rule)](num_channels)


def check_group_rule(rule: Any) -> str:
    """``rule`` if it names a group rule, else UserError listing the rules."""
    if rule not in GROUP_RULES:
        raise UserError(f"unknown group_rule {rule!r}; choose from {', '.join(GROUP_RULES)}")
    return rule


# The factories are plain functions (not classes or lambdas stored as attributes) because timm's
# ``get_norm_layer`` accepts functions and calls them as ``norm_layer(C, device=..., dtype=...)``.
@NORMS.register("batch")
def batch_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.BatchNorm2d(num_channels, **factory_kwargs)


@NORMS.register("group")
def group_norm(num_channels: int, rule: str = DEFAULT_GROUP_RULE, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(group_norm_groups(num_channels, rule), num_channels, **factory_kwargs)


@NORMS.register("layer")
def layer_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(1, num_channels, **factory_kwargs)


@NORMS.register("instance")
def instance_norm(num_channels: int, **factory_kwargs: Any) -> nn.Module:
    return nn.GroupNorm(num_channels, num_channels, **factory_kwargs)


def get_norm_layer(norm: str, group_rule: str | None = None) -> NormFactory:
    """The factory ``f(num_channels) -> nn.Module`` for ``norm`` (batch | group | layer | instance).

    ``group_rule`` (``group`` only; None = ``DEFAULT_GROUP_RULE``): how many groups a width gets, see
    ``GROUP_RULES``. Unknown names raise :class:`~smoothtransfer.errors.UserError` listing the choices.
    """
    factory = NORMS.get(norm)
    if norm == "group" and group_rule is not None and check_group_rule(group_rule) != DEFAULT_GROUP_RULE:
        # a partial, which timm's get_norm_layer accepts and rebinds (it calls f(C, device=, dtype=))
        return functools.partial(factory, rule=group_rule)
    return factory


def norm_names() -> list[str]:
    return NORMS.names()
