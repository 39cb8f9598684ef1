"""Vision Transformers via timm: small-patch ViTs for 32px images and ViT-B/16.

ViTs always use LayerNorm over tokens (timm's default, eps 1e-6); the factory accepts ``norm='layer'``
(or no norm) for them and rejects the CNN norms rather than silently ignoring them.
timm's ViT already has the head interface the :class:`~smoothtransfer.models.factory.Classifier` uses:
``forward_features`` → tokens ``(B, N, D)``, ``forward_head(tokens, pre_logits=True)`` → ``(B, D)``
(class token), ``get_classifier()`` (``head``), ``reset_classifier(K)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from smoothtransfer.errors import UserError

# timm-style hyper-parameters for the patch-4 ViTs on 32px inputs (64 patches + class token).
CIFAR_VITS: dict[str, dict[str, int]] = {
    "vit_tiny_patch4_32": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small_patch4_32": {"embed_dim": 384, "depth": 12, "num_heads": 6},
}


def build_cifar_vit(name: str):
    """A model builder for ``name`` in :data:`CIFAR_VITS`: timm ``VisionTransformer(img_size=input_size,
    patch_size=4)``. Model options (``depth``, ``drop_path_rate``, ``patch_size``, ...) go to timm."""
    arch = CIFAR_VITS[name]

    def build(num_classes: int, norm: str, input_size: int, in_chans: int, pretrained: bool,
              kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        from timm.models.vision_transformer import VisionTransformer

        if pretrained:
            raise UserError(f"there are no public pretrained weights for {name}; pre-train it with "
                            "smoothtransfer or use vit_base_patch16_224")
        args: dict[str, Any] = {"patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True, **arch, **kwargs}
        patch = args["patch_size"]
        if not isinstance(patch, int) or patch < 1 or input_size % patch:
            raise UserError(f"{name}: input_size {input_size} must be a multiple of patch_size {patch}")
        model = VisionTransformer(img_size=input_size, in_chans=in_chans, num_classes=num_classes, **args)
        return model, dict(kwargs)

    return build


def build_timm_vit(variant: str):
    """A model builder for the timm ViT ``variant`` (``pretrained=True`` downloads ImageNet weights)."""

    def build(num_classes: int, norm: str, input_size: int, in_chans: int, pretrained: bool,
              kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
        import timm

        # timm interpolates the position embedding of pretrained weights when img_size differs.
        model = timm.create_model(variant, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                  img_size=input_size, **kwargs)
        return model, dict(kwargs)

    return build
