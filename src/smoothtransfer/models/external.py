"""Models users already have: checkpoints of the reference implementations and off-the-shelf timm classifiers.

Each loads into a :class:`~smoothtransfer.models.factory.Classifier` (images in [0,1] → logits, the input
preprocessing as its first layers), so certification, prediction and ``save_checkpoint`` treat it like a model
trained here. A source is written ``FORMAT:LOCATION`` wherever a checkpoint path is accepted
(``certify/predict/noise-profile --checkpoint``, :func:`~smoothtransfer.models.checkpoint.load_classifier`):

=========================  ===========================================================================================
``cohen:FILE``             locuslab/smoothing (Cohen et al. 2019): ``{'arch', 'state_dict', ...}`` of
                           ``Sequential(NormalizeLayer, net)``; ``arch`` ∈ cifar_resnet20, cifar_resnet110 (CIFAR-10
                           mean/std, 32 px), resnet50 (torchvision ResNet-50 in DataParallel, ImageNet mean/std, 224 px)
``consistency:FILE``       jh-jeong/smoothing-consistency (Jeong & Shin 2020): Cohen's layout
``catrs:FILE``             alinlab/smoothing-catrs (CAT-RS): Cohen's layout, plus cifar100_resnet110 (CIFAR-100 mean/std)
``smoothadv:FILE``         Hadisalman/smoothing-adversarial (Salman et al. 2019) trained with its default
                           ``NormalizeLayer``; also imagenet32_resnet110 (1000 classes, CIFAR-10 mean/std, 32 px)
``smoothadv-center:FILE``  the same, trained with its ``InputCenterLayer`` (subtracts the mean, no division)
``macer:FILE``             RuntianZ/macer (Zhai et al. 2020): ``{'net': ResNet-110 state_dict, 'epoch'}``, no input
                           normalisation (the network sees [0,1] pixels)
``timm:NAME``              a timm model with its pretrained weights, e.g. ``timm:resnet50.a1_in1k`` (downloads online)
``hf-hub:ORG/NAME``        a timm model on the Hugging Face Hub, e.g. ``hf-hub:timm/vit_base_patch16_224.augreg_in1k``
                           (downloads online into the Hugging Face cache; ``@REVISION`` pins a revision)
``local-dir:DIR``          the same layout on disk (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
                           as timm's ``save_pretrained``/``push_to_hf_hub`` write); a bare ``DIR`` holding them works too
=========================  ===========================================================================================

Reference checkpoints are read with ``torch.load(weights_only=True)`` (never unpickling code) and map onto our
own ``resnet20/56/110`` (same module names as their CIFAR ResNet) and ``resnet50`` (timm's ResNet-50, which has
torchvision's module names) with BatchNorm; their normalisation layer holds no tensors, so its mean/std come from
the architecture name (the dataset it implies). timm classifiers keep their own preprocessing inside the base
classifier: ``(x − mean)/std`` with the model's mean/std, then a resize of the whole image to the model's input
size with its interpolation (no crop), so inputs stay [0,1] images at the dataset's resolution and σ stays in
pixel units of that resolution. Both steps are deterministic parts of the base classifier, so certificates
cover them.

Why one file (~590 lines): the ``FORMAT:LOCATION`` syntax, the reference checkpoints and the timm loaders
(file, directory, Hub) share :func:`parse_source`, the ``weights_only`` reader and the spec that lets
:func:`~smoothtransfer.models.checkpoint.build_from_spec` rebuild a timm model offline; the table above is its
one reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.models.factory import Classifier, create_classifier
from smoothtransfer.models.normalize import InputNormalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # alinlab/smoothing-catrs datasets.py
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True)
class PeerFormat:
    """How a reference repository saves its classifier."""

    repo: str
    key: str  # the state_dict's key in the saved dict
    input_layer: str  # "normalize" ((x-mean)/std), "center" (x-mean) or "none"


PEER_FORMATS: dict[str, PeerFormat] = {
    "cohen": PeerFormat("locuslab/smoothing", "state_dict", "normalize"),
    "consistency": PeerFormat("jh-jeong/smoothing-consistency", "state_dict", "normalize"),
    "catrs": PeerFormat("alinlab/smoothing-catrs", "state_dict", "normalize"),
    "smoothadv": PeerFormat("Hadisalman/smoothing-adversarial", "state_dict", "normalize"),
    "smoothadv-center": PeerFormat("Hadisalman/smoothing-adversarial", "state_dict", "center"),
    "macer": PeerFormat("RuntianZ/macer", "net", "none"),
}
HUB_FORMATS = ("timm", "hf-hub", "local-dir")
FORMATS = (*PEER_FORMATS, *HUB_FORMATS)

# Reference ``arch`` names -> (our model, dataset whose mean/std the reference NormalizeLayer uses, input side).
PEER_ARCHS: dict[str, tuple[str, str, int]] = {
    "cifar_resnet20": ("resnet20", "cifar10", 32),
    "cifar_resnet110": ("resnet110", "cifar10", 32),
    "cifar100_resnet110": ("resnet110", "cifar100", 32),  # CAT-RS
    "imagenet32_resnet110": ("resnet110", "cifar10", 32),  # SmoothAdv: get_normalize_layer('imagenet32') is CIFAR-10's
    "resnet50": ("resnet50", "imagenet", 224),
}
DATASET_STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
                 "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ExternalSource:
    """A parsed ``FORMAT:LOCATION`` checkpoint argument."""

    fmt: str
    location: str

    def __str__(self) -> str:
        return f"{self.fmt}:{self.location}"

    @property
    def is_local(self) -> bool:
        return self.fmt in PEER_FORMATS or self.fmt == "local-dir"

    @property
    def run_name(self) -> str:
        """A name for default result directories: the format, the file's folder and name, or the model id
        (reference checkpoints are all called checkpoint.pth.tar, in folders named after σ)."""
        if self.is_local:
            p = Path(self.location).resolve()
            return f"{self.fmt}-{p.parent.name}-{p.name}" if self.fmt in PEER_FORMATS else f"{self.fmt}-{p.name}"
        return f"{self.fmt}-{self.location.replace('/', '-').replace('.', '_')}"


def _is_timm_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in TIMM_WEIGHTS)


def parse_source(text: str | os.PathLike) -> ExternalSource | None:
    """The external source ``text`` names, or None for a smoothtransfer checkpoint path.

    An existing file is always a path (even with a colon in its name). A directory holding ``config.json`` and
    timm weights is ``local-dir``. Local files and directories named after a prefix must exist (UserError).
    """
    s = os.fspath(text)
    p = Path(s)
    if p.is_file():
        return None
    if _is_timm_dir(p):
        return ExternalSource("local-dir", s)
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_-]+):(.*)", s, flags=re.S)
    if m is None or m.group(1).lower() not in FORMATS:
        return None
    fmt, loc = m.group(1).lower(), m.group(2)
    if not loc:
        raise UserError(f"checkpoint '{s}' names no {'model' if fmt in ('timm', 'hf-hub') else 'path'} after '{fmt}:'")
    src = ExternalSource(fmt, loc)
    if fmt in PEER_FORMATS:
        lp = Path(loc).expanduser()
        if not lp.exists():
            raise UserError(f"checkpoint not found: {loc}")
        if not lp.is_file():
            raise UserError(f"{fmt}: checkpoint path is not a file: {loc}")
        src = ExternalSource(fmt, str(lp))
    elif fmt == "local-dir":
        lp = Path(loc).expanduser()
        if not lp.is_dir():
            raise UserError(f"local-dir: {loc} is not a directory")
        if not _is_timm_dir(lp):
            raise UserError(f"local-dir: {loc} lacks config.json and {' or '.join(TIMM_WEIGHTS)} (timm's "
                            "save_pretrained layout)")
        src = ExternalSource(fmt, str(lp))
    return src


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _torch_load(path: str | os.PathLike, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to read a user-supplied file is a problem with the file
        if "Unsupported global" in str(e):
            raise UserError(f"{path} contains pickled Python objects, not only tensors and plain data; "
                            f"refusing to load it (weights_only=True); re-save {what} as tensors "
                            "(torch.save({'arch': ..., 'state_dict': model.state_dict()}))") from None
        raise UserError(f"{path} is not a readable torch file (truncated or corrupt?): {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------------- reference checkpoints


def _block_count(keys: set[str], layer: str) -> int:
    return len({int(m.group(1)) for k in keys if (m := re.match(rf"{layer}\.(\d+)\.", k))})


def _strip_wrappers(sd: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(network weights, normalisation-layer tensors)`` from a state_dict of ``Sequential(normalize, net)``
    (keys ``1.…``; ImageNet ``1.module.…``), a bare network (MACER) or a DataParallel-wrapped one."""
    keys = list(sd)
    norm: dict[str, torch.Tensor] = {}
    if keys and all(k.startswith(("0.", "1.")) for k in keys) and any(k.startswith("1.") for k in keys):
        norm = {k[2:]: v for k, v in sd.items() if k.startswith("0.")}
        sd = {k[2:]: v for k, v in sd.items() if k.startswith("1.")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise UserError(f"{where}: the state_dict holds no network weights")
    return sd, norm


def _infer_arch(sd: dict[str, torch.Tensor], where: str) -> tuple[str, int, int]:
    """``(our model name, num_classes, in_chans)`` from the weights' names and shapes."""
    keys = set(sd)
    if "fc.weight" not in keys or "conv1.weight" not in keys:
        raise UserError(f"{where}: not a ResNet state_dict (no conv1.weight / fc.weight; first keys "
                        f"{sorted(keys)[:3]})")
    num_classes, in_chans = int(sd["fc.weight"].shape[0]), int(sd["conv1.weight"].shape[1])
    bottleneck = any(re.match(r"layer1\.0\.conv3\.", k) for k in keys)
    if any(k.startswith("layer4.") for k in keys):  # ImageNet ResNet (torchvision layout)
        counts = [_block_count(keys, f"layer{i}") for i in range(1, 5)]
        if bottleneck and counts == [3, 4, 6, 3]:
            return "resnet50", num_classes, in_chans
        raise UserError(f"{where}: an ImageNet ResNet with {counts} blocks ({'bottleneck' if bottleneck else 'basic'}) "
                        "is not supported; the reference implementations use ResNet-50 ([3, 4, 6, 3], bottleneck)")
    if bottleneck:
        raise UserError(f"{where}: a CIFAR ResNet with Bottleneck blocks is not supported (the reference "
                        "implementations build cifar_resnet20/110 from BasicBlocks)")
    n = _block_count(keys, "layer1")
    if n == 0 or sd["conv1.weight"].shape[0] != 16:
        raise UserError(f"{where}: not a CIFAR ResNet of width 16 (He et al.) as the reference implementations use")
    depth = 6 * n + 2
    if depth not in (20, 56, 110):
        raise UserError(f"{where}: a CIFAR ResNet-{depth} is not supported; depths 20, 56 and 110 are")
    return f"resnet{depth}", num_classes, in_chans


def load_peer_checkpoint(path: str | os.PathLike, fmt: str = "cohen", *,
                         mean: list[float] | tuple[float, ...] | None = None,
                         std: list[float] | tuple[float, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A reference implementation's checkpoint as our :class:`Classifier` (eval mode, CPU), and its description.

    ``fmt``: one of :data:`PEER_FORMATS`. ``mean``/``std`` override the input normalisation the format implies
    (e.g. for a Cohen-style model trained on another dataset). Returns ``(model, info)``; ``info`` has the keys
    :func:`~smoothtransfer.models.checkpoint.load_classifier` returns (``model_spec``, ``classes`` = None,
    ``dataset``, ``epoch``) plus ``source``, ``reference_arch`` and ``identity`` (format + file SHA-256).
    """
    if fmt not in PEER_FORMATS:
        raise UserError(f"unknown checkpoint format '{fmt}'; choose from: {', '.join(PEER_FORMATS)}")
    peer = PEER_FORMATS[fmt]
    where = f"{fmt}:{path}"
    raw = _torch_load(path, f"the {peer.repo} checkpoint")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a dict saved by {peer.repo}, found a {type(raw).__name__}")
    if raw.get("format") == "smoothtransfer-checkpoint":
        raise UserError(f"{path} is a smoothtransfer checkpoint: pass it without the '{fmt}:' prefix")
    if peer.key in raw and isinstance(raw[peer.key], dict):
        sd = raw[peer.key]
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        sd = raw  # a bare state_dict of the same network
    else:
        hint = ""
        if "net" in raw and fmt != "macer":
            hint = "; it has MACER's key 'net': load it with macer:PATH"
        elif "state_dict" in raw and fmt == "macer":
            hint = "; it has Cohen et al.'s key 'state_dict': load it with cohen:PATH (or smoothadv:/consistency:/catrs:)"
        raise UserError(f"{where}: no '{peer.key}' entry as {peer.repo} saves it (keys: "
                        f"{sorted(map(str, raw))[:6]}){hint}")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{where}: the state_dict holds non-tensor entries")
    net_sd, norm_sd = _strip_wrappers(dict(sd), where)
    name, num_classes, in_chans = _infer_arch(net_sd, where)
    ref_arch = raw.get("arch")
    if ref_arch is not None:
        if ref_arch not in PEER_ARCHS:
            raise UserError(f"{where}: architecture '{ref_arch}' is not supported; supported: "
                            f"{', '.join(PEER_ARCHS)}")
        ours, dataset, size = PEER_ARCHS[ref_arch]
        if ours != name:
            raise UserError(f"{where}: says arch '{ref_arch}' but its weights are a {name}")
    else:  # a bare state_dict / MACER: the weights decide
        if name == "resnet50":
            dataset, size = "imagenet", 224
        else:
            dataset, size = {10: "cifar10", 100: "cifar100"}.get(num_classes), 32
    if mean is None and std is None:
        if peer.input_layer == "none":
            mean, std = [0.0] * in_chans, [1.0] * in_chans
        elif "means" in norm_sd and ("sds" in norm_sd or peer.input_layer == "center"):
            # a fork that registered the normalisation as buffers: use what the file says
            mean = norm_sd["means"].flatten().tolist()
            std = norm_sd["sds"].flatten().tolist() if peer.input_layer == "normalize" else [1.0] * len(mean)
        else:
            if dataset is None:
                raise UserError(f"{where}: cannot tell which dataset's mean/std its input layer used "
                                f"({num_classes} classes, no 'arch'); pass mean= and std= to load_peer_checkpoint")
            m, s = DATASET_STATS[dataset]
            mean, std = list(m), (list(s) if peer.input_layer == "normalize" else [1.0] * len(m))
    elif mean is None or std is None:
        raise UserError("give both mean and std, or neither")
    kwargs = {"stem": "imagenet"} if name == "resnet50" else {}
    model = create_classifier(name, num_classes, norm="batch", mean=list(mean), std=list(std), input_size=size,
                              in_chans=in_chans, **kwargs)
    try:
        result = model.backbone.load_state_dict(net_sd, strict=False)
    except RuntimeError as e:
        raise UserError(f"{where}: weights do not fit a {name}: {_first_line(e)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{where}: weights do not fit a {name} ({len(result.missing_keys)} missing, e.g. "
                        f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. "
                        f"{result.unexpected_keys[:2]})")
    model.spec["source"] = f"{fmt}:{Path(path).name}"
    info = {
        "format": f"external:{fmt}", "source": str(path), "model_spec": model.spec, "classes": None,
        "dataset": dataset, "epoch": raw.get("epoch"), "reference_arch": ref_arch, "reference_repo": peer.repo,
        "identity": f"{fmt}:sha256:{file_sha256(path)}",
    }
    return model.eval(), info


# ---------------------------------------------------------------------------------------------------- timm / hub


_INTERPOLATION = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area"}


class TimmBackbone(nn.Module):
    """A timm model behind its own resize: ``(B, C, H, W)`` normalised images of any size are resized to the
    model's input size (with its interpolation; antialiased when shrinking) before the model sees them.

    Exposes timm's head interface (``forward_features``, ``forward_head``, ``get_classifier``,
    ``reset_classifier``, ``num_features``), so :class:`Classifier` treats it like any backbone.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int], interpolation: str = "bicubic") -> None:
        super().__init__()
        self.model = model
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.interpolation = _INTERPOLATION.get(interpolation, "bilinear")

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.image_size:
            return x
        mode = self.interpolation
        kw: dict[str, Any] = {}
        if mode in ("bilinear", "bicubic"):
            kw = {"align_corners": False, "antialias": x.shape[-2] > self.image_size[0] or x.shape[-1] > self.image_size[1]}
        return F.interpolate(x, size=self.image_size, mode=mode, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.resize(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.resize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.model.reset_classifier(num_classes)

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def head_hidden_size(self) -> int | None:
        return getattr(self.model, "head_hidden_size", None)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, interpolation={self.interpolation}"


def _clean_pretrained_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg fields timm's ``PretrainedCfg`` knows, minus download locations and label lists
    (JSON-able; enough to rebuild the architecture offline)."""
    import dataclasses

    from timm.models import PretrainedCfg

    known = {f.name for f in dataclasses.fields(PretrainedCfg)}
    drop = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "label_names",
            "label_descriptions", "license", "description", "origin_url", "paper_name", "paper_ids", "notes"}
    out = {}
    for k, v in cfg.items():
        if k in known and k not in drop:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _timm_spec(model: nn.Module, architecture: str, model_args: dict[str, Any], pretrained_cfg: dict[str, Any],
               source: str) -> dict[str, Any]:
    cfg = _clean_pretrained_cfg(pretrained_cfg)
    c, h, w = (list(cfg.get("input_size") or (3, 224, 224)) + [None, None, None])[:3]
    mean = [float(v) for v in (cfg.get("mean") or IMAGENET_MEAN)]
    std = [float(v) for v in (cfg.get("std") or IMAGENET_STD)]
    in_chans = int(model_args.get("in_chans", c or 3))
    if len(mean) != in_chans:  # timm repeats the RGB values for other channel counts
        mean, std = (mean * in_chans)[:in_chans], (std * in_chans)[:in_chans]
    spec = {
        "arch": "timm",
        "num_classes": int(model.num_classes),
        "norm": "native",
        "mean": mean,
        "std": std,
        "input_size": int(h),
        "in_chans": in_chans,
        "kwargs": {"model_name": architecture, "model_args": dict(model_args), "pretrained_cfg": cfg,
                   "image_size": [int(h), int(w)], "interpolation": str(cfg.get("interpolation") or "bicubic"),
                   "resize_to": None},
        "lora": None,
        "pretrained": True,
        "resizes_input": True,  # any input resolution: the base classifier resizes to image_size itself
        "source": source,
    }
    try:
        json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: model configuration is not plain JSON data: {e}") from None
    return spec


def _wrap_timm(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    kw = spec["kwargs"]
    backbone = TimmBackbone(model, tuple(kw["image_size"]), kw["interpolation"])
    return Classifier(InputNormalize(spec["mean"], spec["std"]), backbone, spec)


def _create_timm(architecture: str, num_classes: int | None, model_args: dict[str, Any],
                 pretrained_cfg: dict[str, Any] | None, where: str) -> nn.Module:
    import timm

    kwargs = dict(model_args)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if pretrained_cfg is not None:
        kwargs["pretrained_cfg"] = _clean_pretrained_cfg(pretrained_cfg)
    try:
        return timm.create_model(architecture, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: unknown model
        raise UserError(f"{where}: timm cannot build '{architecture}' ({_first_line(e)}); upgrade timm?") from None
    except TypeError as e:
        raise UserError(f"{where}: invalid model arguments for '{architecture}': {_first_line(e)}") from None


def build_timm_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The Classifier a ``timm`` spec describes, randomly initialised; nothing is downloaded."""
    kw = spec.get("kwargs") or {}
    if not isinstance(kw.get("model_name"), str) or not kw.get("image_size"):
        raise UserError("timm model spec lacks kwargs.model_name / kwargs.image_size")
    model = _create_timm(kw["model_name"], spec["num_classes"], kw.get("model_args") or {},
                         kw.get("pretrained_cfg"), f"model spec ({kw['model_name']})")
    return _wrap_timm(model, spec)


def _read_timm_config(path: Path) -> tuple[str, int | None, dict[str, Any], dict[str, Any], list | None]:
    """``(architecture, num_classes, model_args, pretrained_cfg, label_names)`` from a timm ``config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        what = " (a transformers model: use its timm port)" if isinstance(cfg, dict) and "architectures" in cfg else ""
        raise UserError(f"{path} is not a timm model config (no 'architecture'){what}")
    cfg = dict(cfg)
    if "pretrained_cfg" in cfg:
        pretrained_cfg = dict(cfg["pretrained_cfg"] or {})
    else:  # legacy single-dict config
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "num_features", "model_args")}
    num_classes = cfg.get("num_classes", pretrained_cfg.get("num_classes"))
    labels = cfg.get("label_names", pretrained_cfg.get("label_names", cfg.get("labels")))
    model_args = dict(cfg.get("model_args") or {})
    model_args.pop("num_classes", None)
    return str(cfg["architecture"]), num_classes, model_args, pretrained_cfg, labels


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in TIMM_WEIGHTS:
        f = directory / name
        if f.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                try:
                    return load_file(str(f)), f
                except Exception as e:  # a damaged user-supplied file
                    raise UserError(f"{f} is not a readable safetensors file: {_first_line(e)}") from None
            sd = _torch_load(f, "the weights")
            if not isinstance(sd, dict):
                raise UserError(f"{f} does not hold a state_dict")
            return sd, f
    raise UserError(f"{directory} holds no {' or '.join(TIMM_WEIGHTS)}")


def load_timm_dir(directory: str | os.PathLike, source: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model saved in the Hugging Face Hub layout (``config.json`` + weights) as a Classifier."""
    d = Path(directory)
    source = source or f"local-dir:{d}"
    architecture, num_classes, model_args, pretrained_cfg, labels = _read_timm_config(d / "config.json")
    sd, weights = _read_weights(d)
    model = _create_timm(architecture, num_classes, model_args, pretrained_cfg, source)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not fit {architecture}: {_first_line(e)}") from None
    spec = _timm_spec(model, architecture, model_args, pretrained_cfg, source)
    info = {"format": "external:timm", "source": source, "model_spec": spec, "classes": None, "dataset": None,
            "label_names": labels, "identity": f"{source.split(':', 1)[0]}:sha256:{file_sha256(weights)}"}
    return _wrap_timm(model, spec).eval(), info


def load_timm_pretrained(name: str, *, pretrained_file: str | os.PathLike | None = None,
                         **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(name, pretrained=True)`` as a Classifier (downloads unless ``pretrained_file``
    gives the weights: timm's ``pretrained_cfg_overlay=dict(file=...)``). ``kwargs`` go to ``create_model``."""
    import timm

    source = f"timm:{name}"
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise UserError(f"weights file not found: {pretrained_file}")
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(pretrained_file)}
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as e:
        raise UserError(f"{source}: {_first_line(e)}") from None
    except OSError as e:  # huggingface_hub / urllib download errors
        raise UserError(f"{source}: could not get the pretrained weights ({_first_line(e)}); check the network "
                        "or the Hugging Face cache, or use local-dir:DIR") from None
    pretrained_cfg = dict(model.pretrained_cfg)
    architecture = str(pretrained_cfg.get("architecture") or name.split(".")[0])
    model_args = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg_overlay", "num_classes")}
    spec = _timm_spec(model, architecture, model_args, pretrained_cfg, source)
    identity = f"timm:{name}" if pretrained_file is None else f"timm:{name}:sha256:{file_sha256(pretrained_file)}"
    info = {"format": "external:timm", "source": source, "model_spec": spec, "classes": None, "dataset": None,
            "label_names": pretrained_cfg.get("label_names"), "identity": identity}
    return _wrap_timm(model, spec).eval(), info


def load_hf_hub(model_id: str, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model from the Hugging Face Hub (``ORG/NAME`` or ``ORG/NAME@REVISION``), downloaded into (or read
    from) the Hugging Face cache, as a Classifier. ``kwargs`` go to ``hf_hub_download`` (``cache_dir``, ...)."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = model_id.partition("@")
    source = f"hf-hub:{model_id}"
    try:
        cfg = Path(hf_hub_download(repo, "config.json", revision=revision or None, **kwargs))
        weights_err: Exception | None = None
        for name in TIMM_WEIGHTS:
            try:
                hf_hub_download(repo, name, revision=revision or None, **kwargs)
                break
            except Exception as e:  # EntryNotFoundError: try the next file name
                weights_err = e
        else:
            raise OSError(f"no {' or '.join(TIMM_WEIGHTS)} in {repo}: {weights_err}")
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise UserError(f"{source}: could not get the model from the Hugging Face Hub ({_first_line(e)}); "
                        "check the network or the cache, or use local-dir:DIR") from None
    return load_timm_dir(cfg.parent, source=source)


# ---------------------------------------------------------------------------------------------------- entry point


def load_external(source: ExternalSource | str, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``(Classifier in eval mode on CPU, info)`` for an external source (``FORMAT:LOCATION``, see the module
    docstring). ``kwargs`` go to the format's loader (``mean``/``std`` for reference checkpoints,
    ``pretrained_file`` for ``timm:``)."""
    src = parse_source(source) if not isinstance(source, ExternalSource) else source
    if src is None:
        raise UserError(f"'{source}' names no external model; prefixes: {', '.join(f + ':' for f in FORMATS)}")
    if src.fmt in PEER_FORMATS:
        return load_peer_checkpoint(src.location, src.fmt, **kwargs)
    if src.fmt == "local-dir":
        return load_timm_dir(src.location)
    if src.fmt == "hf-hub":
        return load_hf_hub(src.location, **kwargs)
    return load_timm_pretrained(src.location, **kwargs)


__all__ = ["FORMATS", "PEER_ARCHS", "PEER_FORMATS", "ExternalSource", "TimmBackbone", "build_timm_from_spec",
           "load_external", "load_hf_hub", "load_peer_checkpoint", "load_timm_dir", "load_timm_pretrained",
           "parse_source"]
