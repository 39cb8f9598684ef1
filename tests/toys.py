"""Toy models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv-BN-ReLU-Conv-ReLU-pool-linear on ``(B,3,H,W)`` → ``(B,k)``, the same weights every time (the caller's
    RNG untouched), BatchNorm running mean away from zero so that train vs eval mode is observable."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(8, k))
            self.body[1].running_mean.uniform_(-0.1, 0.1)

    def forward(self, x):
        return self.body(x)
