"""Optimisers with parameter groups, and linear warm-up + cosine schedules stepped per iteration."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from smoothtransfer.config import OptimConfig


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr: float,
                 head_names: set[str] | None = None, head_lr_mult: float = 1.0) -> list[dict]:
    """Split trainable parameters into (decay, no-decay) × (body, head) groups.

    Norm weights and biases (1-d tensors) get no weight decay, as is standard for GN/LN/BN and ViTs; the
    fresh head of a fine-tuned model may get its own learning rate (``head_lr_mult``).
    """
    head_names = head_names or set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        is_head = name in head_names
        groups.setdefault((no_decay, is_head), []).append(p)
    out = []
    for (no_decay, is_head), params in sorted(groups.items()):
        out.append({
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * (head_lr_mult if is_head else 1.0),
            "name": f"{'head' if is_head else 'body'}{'_no_decay' if no_decay else ''}",
        })
    return out


def build_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "step":  # ÷10 at 50% and 75%, as in Cohen et al.'s ResNet schedules
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
