"""LoRA fine-tuning of a :class:`~smoothtransfer.models.factory.Classifier` with peft.

``apply_lora`` injects peft LoRA layers into the backbone in place (``peft.inject_adapter_in_model``, so
the model keeps its class, head interface and ``spec``), freezes everything but the adapters and the
classification head, and records the resolved configuration in ``spec["lora"]``;
:func:`~smoothtransfer.models.factory.build_from_spec` re-applies it so saved state_dicts load.

Default targets: ViTs adapt the attention ``qkv`` projection of every block. timm fuses query, key and
value into one Linear, so this adapts the keys too, where FT-CADIS adapts only query and value; the extra
rank-r update on keys is small and keeps the model a plain timm ViT. CNNs adapt every Conv2d and Linear
outside the head (peft supports LoRA on Conv2d). The head is never adapted: it is trained in full.

Norm layers and their running statistics are not adapters: BatchNorm statistics still update in
``train()`` mode unless the training loop keeps them in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from smoothtransfer._optional import require
from smoothtransfer.errors import UserError
from smoothtransfer.models.factory import MODELS, Classifier

_ADAPTABLE = (nn.Linear, nn.Conv2d)


def _head_module_names(model: Classifier) -> set[str]:
    head = model.head
    return {name for name, m in model.backbone.named_modules() for h in head.modules() if m is h}


def default_lora_targets(model: Classifier) -> list[str]:
    """Backbone module names LoRA adapts by default (see the module docstring)."""
    family = MODELS.get(model.spec["arch"]).family if model.spec.get("arch") in MODELS else "cnn"
    head = _head_module_names(model)
    names = []
    for name, m in model.backbone.named_modules():
        if name in head or not isinstance(m, _ADAPTABLE):
            continue
        if family == "vit" and not (isinstance(m, nn.Linear) and name.split(".")[-1] == "qkv"):
            continue
        names.append(name)
    return names


def resolve_lora_targets(model: Classifier, targets: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Full backbone module names for ``targets``: None → defaults; otherwise each entry matches modules
    whose name equals it or ends with ``"." + entry`` (e.g. ``"qkv"``, ``"mlp.fc1"``, ``"layer4.0.conv1"``).
    """
    if targets is None:
        names = default_lora_targets(model)
        if not names:
            raise UserError(f"no layers to adapt with LoRA in {model.spec.get('arch')}")
        return names
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t for t in targets):
        raise UserError(f"LoRA targets must be a list of module names, got {targets!r}")
    head = _head_module_names(model)
    modules = dict(model.backbone.named_modules())
    names: list[str] = []
    for t in targets:
        hits = [n for n in modules if n not in head and (n == t or n.endswith("." + t))]
        if not hits:
            raise UserError(f"LoRA target '{t}' matches no layer outside the head of {model.spec.get('arch')}")
        bad = [n for n in hits if not isinstance(modules[n], _ADAPTABLE)]
        if bad:
            raise UserError(f"LoRA target '{t}' matches {bad[0]} ({type(modules[bad[0]]).__name__}); "
                            "only Linear and Conv2d layers can be adapted")
        names += [n for n in hits if n not in names]
    order = {n: i for i, n in enumerate(modules)}
    return sorted(names, key=order.__getitem__)  # module order, whatever the order of ``targets``


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter parameters of ``model`` (``lora_A`` / ``lora_B`` weights)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def apply_lora(model: Classifier, rank: int = 4, alpha: float = 4, targets: list[str] | None = None,
               dropout: float = 0.0) -> Classifier:
    """Add LoRA adapters (update ``(alpha / rank) · B A``, B zero-initialised) to ``model`` in place.

    Afterwards only the adapters and the head require grad; the outputs are unchanged until training.
    Returns ``model``.
    """
    # peft comes with the [lora] extra: imported here, so that the core install never needs it.
    peft = require("peft", "LoRA fine-tuning")
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    if not isinstance(model, Classifier):
        raise UserError(f"apply_lora needs a smoothtransfer Classifier, got {type(model).__name__}")
    if model.spec.get("lora"):
        raise UserError("this model already has LoRA adapters; merge_lora() it before adding new ones")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UserError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    names = resolve_lora_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names,
                        bias="none")
    # peft creates each adapter on its base layer's device and freezes the backbone (head included).
    inject_adapter_in_model(config, model.backbone)
    adapters = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    for p in model.head_parameters():
        p.requires_grad_(True)
    model.spec["lora"] = {"rank": rank, "alpha": alpha, "targets": names, "dropout": float(dropout)}
    return model


def merge_lora(model: Classifier) -> Classifier:
    """Fold the adapters into the adapted weights, in place, and return ``model`` as a plain model.

    The result has the original module structure and state_dict keys (``spec["lora"]`` is None), its
    outputs match the adapted model's up to float rounding, and all its parameters require grad again.
    A model without adapters is returned unchanged.
    """
    LoraLayer = require("peft.tuners.lora", "merging LoRA adapters").LoraLayer  # [lora] extra, see apply_lora

    if not model.spec.get("lora"):
        return model
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)  # safe_merge: raise instead of writing NaN/inf weights
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, module.get_base_layer())
    if hasattr(model.backbone, "peft_config"):
        del model.backbone.peft_config  # set by peft's tuner on injection; not part of a plain model
    for p in model.parameters():
        p.requires_grad_(True)
    model.spec["lora"] = None
    return model


@torch.no_grad()
def randomize_lora_(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Give every ``lora_B`` a random value (it starts at zero), e.g. to test merging on a non-trivial update."""
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.copy_(torch.randn(p.shape, generator=generator) * std)


__all__ = ["apply_lora", "merge_lora", "default_lora_targets", "resolve_lora_targets",
                      "lora_parameters", "randomize_lora_"]
