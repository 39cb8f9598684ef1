"""Models: input normalisation + backbone (CNNs with any norm, timm ViTs) [+ LoRA], behind one Classifier.

>>> from smoothtransfer.models import create_classifier
>>> model = create_classifier("resnet110", num_classes=10, norm="layer")   # images in [0,1] → logits

timm and peft are imported only when a model that needs them is built.
"""

from smoothtransfer.models.checkpoint import (
    build_from_spec,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
)
from smoothtransfer.models.factory import (
    MODELS,
    Classifier,
    ModelEntry,
    create_classifier,
)
from smoothtransfer.models.lora import apply_lora, lora_parameters, merge_lora
from smoothtransfer.models.normalize import CIFAR10_MEAN, CIFAR10_STD, InputNormalize
from smoothtransfer.models.norms import NORMS, get_norm_layer

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MODELS",
    "NORMS",
    "Classifier",
    "InputNormalize",
    "ModelEntry",
    "apply_lora",
    "build_from_spec",
    "create_classifier",
    "get_norm_layer",
    "load_checkpoint",
    "load_classifier",
    "lora_parameters",
    "merge_lora",
    "save_checkpoint",
]
