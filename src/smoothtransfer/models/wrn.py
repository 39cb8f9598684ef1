"""WideResNet (Zagoruyko & Komodakis, 2016), pre-activation blocks, any norm; WRN-28-10 by default."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.norms import NormFactory, get_norm_layer
from smoothtransfer.models.resnet import PooledLinearHead


class WideBasicBlock(nn.Module):
    """norm → ReLU → conv3x3 → norm → ReLU → (dropout) → conv3x3, plus a 1x1 conv shortcut on shape change."""

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormFactory, dropout: float) -> None:
        super().__init__()
        self.bn1 = norm_layer(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        # As in the reference code, the shortcut branches off the pre-activated input when it is a conv.
        identity = x if self.shortcut is None else self.shortcut(o)
        o = self.relu(self.bn2(self.conv1(o)))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + identity


class WideResNet(PooledLinearHead, nn.Module):
    """WRN-``depth``-``widen_factor``; widths 16, 16k, 32k, 64k; ``(B, C, H, W)`` → ``(B, num_classes)``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, norm_layer: NormFactory,
                 in_chans: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise UserError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise UserError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        layers, inplanes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [WideBasicBlock(inplanes, planes, stride, norm_layer, dropout)]
            blocks += [WideBasicBlock(planes, planes, 1, norm_layer, dropout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = norm_layer(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, 64k, H/4, W/4)`` (after the final norm + ReLU)."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.relu(self.bn(x))


def build_wrn(depth: int, widen_factor: int):
    """A model builder for WRN-depth-widen_factor; model option ``dropout`` (default 0.0)."""

    def build(num_classes: int, norm: str, input_size: int, in_chans: int, pretrained: bool,
              kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        kwargs = dict(kwargs)
        dropout = float(kwargs.pop("dropout", 0.0))
        group_rule = kwargs.pop("group_rule", None)  # set by the factory for norm='group'
        if kwargs:
            raise UserError(f"wrn{depth}_{widen_factor} only takes the model option 'dropout', "
                            f"got {sorted(kwargs)}")
        if pretrained:
            raise UserError(f"there are no pretrained weights for wrn{depth}_{widen_factor}; "
                            "train it or load a smoothtransfer checkpoint")
        model = WideResNet(depth, widen_factor, num_classes, get_norm_layer(norm, group_rule), in_chans, dropout)
        return model, {"dropout": dropout}

    return build
