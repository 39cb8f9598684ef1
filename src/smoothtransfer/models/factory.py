"""Model registry and the :class:`Classifier` every other module works with.

A classifier is ``InputNormalize`` (first layer; mean/std in ``state_dict`` and in ``spec``) → optional
resize → backbone. ``spec`` is a JSON-able dict from which
:func:`smoothtransfer.models.checkpoint.build_from_spec` rebuilds the same architecture (incl. LoRA adapters)
without downloading anything, so a checkpoint is ``spec + state_dict``.

Model names (``MODELS.names()``):

==========================  ====================================================================
resnet20 resnet56 resnet110  CIFAR ResNets of He et al. (2016), widths 16/32/64 (Cohen et al.)
resnet18 resnet50 resnet152  timm ResNets; 3x3 stride-1 stem without max-pool when input <= 64px
wrn28_10                     WideResNet-28-10
vit_tiny_patch4_32           timm ViT, patch 4, ``img_size=input_size`` (192-d, 12 blocks, 3 heads)
vit_small_patch4_32          timm ViT, patch 4 (384-d, 12 blocks, 6 heads)
vit_base_patch16_224         timm ViT-B/16; inputs are resized to 224px unless ``resize_to=None``
==========================  ====================================================================

CNNs take any norm (batch | group | layer | instance; default batch); ViTs only ``layer`` (default).
``group`` has at least 4 channels per group on narrow layers and 32 groups on wide ones (the ``c4`` rule of
:mod:`smoothtransfer.models.norms`); a ``group`` spec records ``kwargs.group_rule`` and ``norm_groups``
(channels → groups), and a spec without ``group_rule`` (written before the rule existed) rebuilds with the
old ``max32`` rule it was trained with.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.normalize import CIFAR10_MEAN, CIFAR10_STD, InputNormalize
from smoothtransfer.models.norms import (
    DEFAULT_GROUP_RULE,
    check_group_rule,
    get_norm_layer,
)
from smoothtransfer.models.resnet import build_cifar_resnet, build_timm_resnet
from smoothtransfer.models.vit import build_cifar_vit, build_timm_vit
from smoothtransfer.models.wrn import build_wrn
from smoothtransfer.registry import Registry

# build(num_classes, norm, input_size, in_chans, pretrained, kwargs) -> (backbone, resolved kwargs).
# ``input_size`` is the size the backbone sees (after any resize); the resolved kwargs are what the
# spec records, so a rebuild does not depend on defaults that might change.
Builder = Callable[[int, str, int, int, bool, dict[str, Any]], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: its builder and what it accepts."""

    build: Builder
    family: str  # "cnn" or "vit"; LoRA picks its default targets from this
    norms: tuple[str, ...] | None = None  # allowed norms; None = all of smoothtransfer.models.norms
    default_norm: str = "batch"
    default_resize_to: int | None = None
    timm_name: str | None = None  # for the default mean/std of pretrained weights


MODELS: Registry[ModelEntry] = Registry("model")
for _depth in (20, 56, 110):
    MODELS.register(f"resnet{_depth}", ModelEntry(build_cifar_resnet(_depth), "cnn"))
for _variant in ("resnet18", "resnet50", "resnet152"):
    MODELS.register(_variant, ModelEntry(build_timm_resnet(_variant), "cnn", timm_name=_variant))
MODELS.register("wrn28_10", ModelEntry(build_wrn(28, 10), "cnn"))
for _name in ("vit_tiny_patch4_32", "vit_small_patch4_32"):
    MODELS.register(_name, ModelEntry(build_cifar_vit(_name), "vit", norms=("layer",), default_norm="layer"))
MODELS.register("vit_base_patch16_224", ModelEntry(build_timm_vit("vit_base_patch16_224"), "vit", norms=("layer",),
                                                   default_norm="layer", default_resize_to=224,
                                                   timm_name="vit_base_patch16_224"))


class Classifier(nn.Module):
    """Base classifier for randomized smoothing: images in [0,1] → logits.

    ``forward(x)``: ``(B, C, H, W)`` in [0,1] → ``(B, K)``. ``forward_features(x)`` → ``(B, D)``, the pooled
    features the head sees (``D == num_features``). Attributes: ``normalize`` (first layer), ``backbone``
    (timm head interface: ``forward_features``/``forward_head``/``get_classifier``/``reset_classifier``),
    ``spec`` (JSON-able; see :func:`create_classifier`).
    """

    def __init__(self, normalize: InputNormalize, backbone: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.spec: dict[str, Any] = copy.deepcopy(spec)
        self._backbone_frozen = False

    @property
    def resize_to(self) -> int | None:
        return self.spec.get("kwargs", {}).get("resize_to")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [0,1] → normalised, resized to the backbone's size if it has one."""
        x = self.normalize(x)
        size = self.resize_to
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            # Deterministic bilinear resize: part of the base classifier, so certificates stay valid.
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < max(x.shape[-2:]))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` in [0,1] → logits ``(B, num_classes)``."""
        return self.backbone(self._prepare(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` in [0,1] → pooled features ``(B, num_features)`` before the head."""
        b = self.backbone
        return b.forward_head(b.forward_features(self._prepare(x)), pre_logits=True)

    @property
    def head(self) -> nn.Module:
        """The classification layer (``Linear(num_features, num_classes)``)."""
        return self.backbone.get_classifier()

    @property
    def num_features(self) -> int:
        b = self.backbone
        return int(getattr(b, "head_hidden_size", None) or b.num_features)

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the head (incl. LoRA adapters, if any)."""
        head_ids = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head_ids]

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised ``Linear(num_features, num_classes)`` (same device/dtype)."""
        _check_positive_int(num_classes, "num_classes")
        old = next(self.head.parameters())
        self.backbone.reset_classifier(num_classes)
        self.head.to(device=old.device, dtype=old.dtype)
        self.spec["num_classes"] = int(num_classes)
        if self._backbone_frozen:
            self.train(self.training)

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Fixed-feature fine-tuning: only the head trains, and the backbone stays in eval mode.

        Keeping the backbone in eval mode (even inside ``model.train()``) freezes BatchNorm running
        statistics and dropout too, which ``requires_grad=False`` alone would not (DESIGN rule 9).
        """
        self._backbone_frozen = frozen
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        for p in self.head_parameters():
            p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self._backbone_frozen:
            self.backbone.eval()
            self.head.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"arch={self.spec.get('arch')}, norm={self.spec.get('norm')}, resize_to={self.resize_to}"


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def _pretrained_mean_std(timm_name: str | None) -> tuple[list[float], list[float]] | None:
    """The mean/std timm's pretrained weights were trained with (read from timm's config, no download)."""
    if timm_name is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return list(cfg.mean), list(cfg.std)


def create_classifier(name: str, num_classes: int, norm: str | None = None,
                      mean: list[float] | tuple[float, ...] | None = None,
                      std: list[float] | tuple[float, ...] | None = None, input_size: int = 32,
                      in_chans: int = 3, pretrained: bool = False, **kwargs: Any) -> Classifier:
    """Build a registered model as a :class:`Classifier`.

    ``norm``: batch | group | layer | instance for CNNs (None → batch); ViTs use LayerNorm, so only
    ``layer`` or None. ``mean``/``std``: the input normalisation; when both are None they default to the
    pretrained weights' values if ``pretrained`` (e.g. 0.5 for ViT-B/16), else to CIFAR-10's (Cohen et al.).
    ``input_size``: the side of the images the classifier receives. ``pretrained=True`` downloads timm
    ImageNet weights (online only; resnet18/50/152 with norm='batch', vit_base_patch16_224).
    ``kwargs``: model options, e.g. ``resize_to`` (any model: bilinearly resize the normalised input to this
    side before the backbone; vit_base_patch16_224 defaults to 224), ``stem`` (timm ResNets), ``dropout``
    (WRN), ``drop_path_rate`` (timm), ``group_rule`` (norm='group' only: ``c4``, the default, or the legacy
    ``max32``; see :mod:`smoothtransfer.models.norms`). The spec records the resolved options, and for
    norm='group' the groups each width got (``norm_groups``: ``{"16": 4, "32": 8, ...}``).
    """
    entry = MODELS.get(name)
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(input_size, "input_size")
    _check_positive_int(in_chans, "in_chans")
    norm = entry.default_norm if norm is None else norm
    get_norm_layer(norm)  # unknown norm names fail here, listing the choices
    if entry.norms is not None and norm not in entry.norms:
        raise UserError(f"{name} always uses LayerNorm; pass norm='layer' (or no norm), not norm='{norm}'")
    if (mean is None) != (std is None):
        raise UserError("give both mean and std for the input normalisation, or neither")
    group_rule = kwargs.pop("group_rule", None)
    if norm == "group":
        group_rule = check_group_rule(DEFAULT_GROUP_RULE if group_rule is None else group_rule)
        kwargs["group_rule"] = group_rule  # the builders pass it to get_norm_layer
    elif group_rule is not None:
        raise UserError(f"group_rule applies to norm='group' only, not norm='{norm}'")
    resize_to = kwargs.pop("resize_to", entry.default_resize_to)
    if resize_to is not None:
        _check_positive_int(resize_to, "resize_to")
        if resize_to == input_size:
            resize_to = None
    backbone_size = resize_to or input_size
    if mean is None:
        defaults = _pretrained_mean_std(entry.timm_name) if pretrained else None
        mean, std = defaults if defaults is not None else (list(CIFAR10_MEAN), list(CIFAR10_STD))
        if len(mean) != in_chans:
            raise UserError(f"pass mean and std for in_chans={in_chans} (the defaults are for RGB images)")
    normalize = InputNormalize(mean, std)
    if normalize.num_channels != in_chans:
        raise UserError(f"mean/std have {normalize.num_channels} channels but in_chans is {in_chans}")
    try:
        backbone, resolved = entry.build(num_classes, norm, backbone_size, in_chans, bool(pretrained), kwargs)
    except TypeError as e:  # unknown keyword for a timm model
        raise UserError(f"invalid model option for {name}: {e}") from None
    except OSError as e:
        if not pretrained:
            raise
        # huggingface_hub's download errors are OSErrors; offline runs end here.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not get the pretrained weights for {name} ({first}); check the network or "
                        "the Hugging Face cache, or use pretrained=False") from None
    spec = {
        "arch": name,
        "num_classes": int(num_classes),
        "norm": norm,
        "mean": normalize.mean_values,
        "std": normalize.std_values,
        "input_size": int(input_size),
        "in_chans": int(in_chans),
        "kwargs": {**resolved, "resize_to": resize_to},
        "lora": None,
        "pretrained": bool(pretrained),  # provenance only: a rebuild never downloads
    }
    if norm == "group":
        spec["kwargs"]["group_rule"] = group_rule
        spec["norm_groups"] = _norm_groups(backbone)
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"model options for {name} must be JSON values (numbers, strings, lists): {e}") from None
    return Classifier(normalize, backbone, spec)


def _norm_groups(backbone: nn.Module) -> dict[str, int]:
    """``{"<channels>": groups}`` of the GroupNorm layers in ``backbone`` (JSON keys), by width."""
    groups = {m.num_channels: m.num_groups for m in backbone.modules() if isinstance(m, nn.GroupNorm)}
    return {str(c): groups[c] for c in sorted(groups)}
