"""ResNets: the CIFAR ResNet-20/56/110 of He et al. (2016) and timm's ResNet-18/50/152, any norm.

Every backbone here follows timm's head interface, so :class:`~smoothtransfer.models.factory.Classifier`
treats all of them alike: ``forward_features(x)`` → unpooled ``(B, D, h, w)``, ``forward_head(f,
pre_logits)`` → ``(B, D)`` or ``(B, K)``, ``get_classifier()``, ``reset_classifier(K)``, ``num_features``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.norms import NormFactory, get_norm_layer


class PooledLinearHead:
    """Mixin giving a backbone with ``forward_features`` and ``num_features`` timm's head interface.

    Subclasses define ``self.fc`` (``nn.Linear(num_features, K)``) and ``self.num_features``.
    """

    num_features: int
    fc: nn.Linear

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``x``: ``(B, D, h, w)`` → pooled ``(B, D)`` if ``pre_logits`` else logits ``(B, K)``."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` (already normalised) → logits ``(B, K)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """He et al.'s post-activation basic block; the shortcut is a 1x1 conv + norm when the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), norm_layer(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(PooledLinearHead, nn.Module):
    """CIFAR ResNet of depth 6n+2 (20, 56, 110, ...), widths 16/32/64, as in Cohen et al.'s ``cifar_resnet``.

    ``forward``: ``(B, in_chans, H, W)`` → ``(B, num_classes)``; global average pooling instead of Cohen's
    fixed ``AvgPool2d(8)`` so other input sizes work too (identical at 32px).
    """

    def __init__(self, depth: int, num_classes: int, norm_layer: NormFactory, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_chans, 16)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(inplanes, planes, stride, norm_layer)]
            blocks += [BasicBlock(planes, planes, 1, norm_layer) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → ``(B, 64, H/4, W/4)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def build_cifar_resnet(depth: int):
    """A model builder (see :mod:`smoothtransfer.models.factory`) for a CIFAR ResNet of ``depth``."""

    def build(num_classes: int, norm: str, input_size: int, in_chans: int, pretrained: bool,
              kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        kwargs = dict(kwargs)
        group_rule = kwargs.pop("group_rule", None)  # set by the factory for norm='group'
        if kwargs:
            raise UserError(f"resnet{depth} takes no extra model options, got {sorted(kwargs)}")
        if pretrained:
            raise UserError(f"there are no pretrained weights for resnet{depth}; "
                            "train it or load a smoothtransfer checkpoint")
        return CifarResNet(depth, num_classes, get_norm_layer(norm, group_rule), in_chans), {}

    return build


def build_timm_resnet(variant: str):
    """A model builder for timm's ``variant`` (resnet18/50/152) with any norm and a choice of stem.

    ``stem`` (model option): ``"cifar"`` replaces timm's 7x7 stride-2 conv + max-pool with a 3x3 stride-1
    conv and no pooling (the usual CIFAR ResNet-18 stem, which keeps 32px inputs at 32x32 into layer1);
    ``"imagenet"`` keeps timm's stem. Default: ``"cifar"`` when ``input_size <= 64``, else ``"imagenet"``.
    With ``pretrained=True`` and the CIFAR stem, every weight but the new stem conv is ImageNet's.
    Other options (``drop_rate``, ``drop_path_rate``, ...) go to ``timm.create_model``.
    """

    def build(num_classes: int, norm: str, input_size: int, in_chans: int, pretrained: bool,
              kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        import timm

        kwargs = dict(kwargs)
        group_rule = kwargs.pop("group_rule", None)  # set by the factory for norm='group'
        stem = kwargs.pop("stem", None) or ("cifar" if input_size <= 64 else "imagenet")
        if stem not in ("cifar", "imagenet"):
            raise UserError(f"{variant} option stem must be 'cifar' or 'imagenet', got {stem!r}")
        if pretrained and norm != "batch":
            # timm's ImageNet weights carry BatchNorm running statistics that a GroupNorm cannot hold.
            raise UserError(f"pretrained {variant} weights were trained with BatchNorm; use norm='batch' "
                            f"or pretrained=False for norm='{norm}'")
        model = timm.create_model(variant, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                  norm_layer=get_norm_layer(norm, group_rule), **kwargs)
        if stem == "cifar":
            if not isinstance(model.conv1, nn.Conv2d):
                raise UserError(f"{variant}: stem='cifar' needs timm's plain conv stem; drop 'stem_type'")
            model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
        return model, {"stem": stem, **kwargs}

    return build
