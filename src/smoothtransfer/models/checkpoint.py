"""Checkpoints: ``model_spec + state_dict`` plus what produced them, loadable with ``weights_only=True``.

This module sits above the model builders (``factory``, ``lora``, ``external``): :func:`build_from_spec`
rebuilds any of their models from a spec, and :func:`load_classifier` loads our checkpoints and models
trained elsewhere. (It was ``smoothtransfer.train.checkpoint``, which still re-exports it.)

A checkpoint is one ``torch.save`` file holding a dict::

    format        "smoothtransfer-checkpoint"        version   1
    model_spec    Classifier.spec (JSON-able; a denoiser's: models.denoisers.denoiser_spec)
    state_dict    the model's weights (incl. input normalisation)
    classes       list of class names                dataset   dataset name (or a dict describing it)
    config        the run's configuration (dict)     git_rev   source revision, "-dirty" if modified
    epoch         int or None                        train_state  optimizer/scheduler/EMA/RNG state or None
    extra         anything else (plain data)         smoothtransfer_version, torch_version

Everything in it is tensors and plain Python data, so :func:`load_checkpoint` never unpickles code
(``torch.load(weights_only=True)``); :func:`save_checkpoint` converts dataclasses, paths and numpy scalars
and refuses anything else *before* writing, so a checkpoint that cannot be loaded is never written.
Saving is atomic (temporary file in the same directory + ``os.replace``): a crash leaves the old file.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import nn

from smoothtransfer import __version__
from smoothtransfer.errors import UserError
from smoothtransfer.models.external import build_timm_from_spec, load_external, parse_source
from smoothtransfer.models.factory import Classifier, create_classifier
from smoothtransfer.models.lora import apply_lora
from smoothtransfer.models.norms import LEGACY_GROUP_RULE
from smoothtransfer.utils import WRITE_ERRNOS, git_revision, resolve_device

__all__ = ["FORMAT", "RUN_CHECKPOINT", "VERSION", "build_from_spec", "capture_rng_state", "load_checkpoint", "load_classifier",
           "restore_rng_state", "save_checkpoint", "to_weights_only", "unwrap_model"]

FORMAT = "smoothtransfer-checkpoint"
VERSION = 1
#: the file name of a training run's checkpoint in its directory (the training engine's one resume format)
RUN_CHECKPOINT = "checkpoint.pt"

_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


_SPEC_KEYS = ("arch", "num_classes", "norm", "mean", "std", "input_size", "in_chans", "kwargs")


def build_from_spec(spec: dict[str, Any]) -> Classifier:
    """Rebuild the architecture described by ``spec`` (as in ``Classifier.spec``), randomly initialised.

    LoRA adapters in ``spec["lora"]`` are re-applied, so the model accepts the saved ``state_dict``.
    Nothing is downloaded (``pretrained`` is only recorded). Unknown archs raise UserError.
    """
    if not isinstance(spec, dict):
        raise UserError(f"model spec must be a dict, got {type(spec).__name__}")
    if spec.get("denoiser"):  # a train-denoiser checkpoint (models.denoisers.denoiser_spec)
        raise UserError("this checkpoint holds a denoiser, not a classifier: load it with load_denoiser(DIR) "
                        "or pass its directory as --denoiser")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise UserError(f"model spec is missing {', '.join(missing)}")
    if not isinstance(spec["kwargs"], dict):
        raise UserError("model spec 'kwargs' must be a dict")
    if spec["arch"] == "timm":  # an off-the-shelf timm classifier (smoothtransfer.models.external)
        model = build_timm_from_spec(spec)
    else:
        kwargs = dict(spec["kwargs"])
        if spec["norm"] == "group":
            # specs written before group_rule existed were built with the old rule: rebuild them as trained
            kwargs.setdefault("group_rule", LEGACY_GROUP_RULE)
        model = create_classifier(spec["arch"], spec["num_classes"], norm=spec["norm"], mean=spec["mean"],
                                  std=spec["std"], input_size=spec["input_size"], in_chans=spec["in_chans"],
                                  pretrained=False, **kwargs)
        recorded = spec.get("norm_groups")
        if recorded is not None and recorded != model.spec.get("norm_groups"):
            raise UserError(f"model spec records GroupNorm groups {recorded} but its group_rule builds "
                            f"{model.spec.get('norm_groups')}")
    model.spec["pretrained"] = bool(spec.get("pretrained", False))
    lora = spec.get("lora")
    if lora:
        if not isinstance(lora, dict):
            raise UserError("model spec 'lora' must be a dict or null")
        apply_lora(model, **lora)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The :class:`Classifier` inside ``torch.compile`` / DDP / DataParallel wrappers (their keys differ)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def to_weights_only(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as data ``torch.load(weights_only=True)`` accepts: tensors, plain scalars/str/bytes, dtypes,
    devices, and dicts/lists/tuples/sets of those. Dataclasses and named tuples become dicts, paths become
    str, numpy scalars and enums become Python scalars; anything else raises TypeError naming ``where``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):  # np.float64 subclasses float but pickles as a numpy object
        return obj.item()
    if isinstance(obj, enum.Enum):
        return to_weights_only(obj.value, where)
    if type(obj) in _LEAVES:
        return obj
    for base in (bool, int, float, str, bytes):  # subclasses of plain types pickle by class: unwrap them
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_weights_only(getattr(obj, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):  # named tuple
        return to_weights_only(obj._asdict(), where)
    if isinstance(obj, dict):
        items = [(to_weights_only(k, f"{where} key"), to_weights_only(v, f"{where}[{k!r}]"))
                 for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_weights_only(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return {to_weights_only(v, f"{where} item") for v in obj}
    hint = " (convert it with torch.as_tensor)" if isinstance(obj, np.ndarray) else ""
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a weights_only "
                    f"checkpoint cannot hold{hint}; store tensors and plain data only")


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as weights_only-safe data (for ``train_state``)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored when present and CUDA is available)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, classes: list[str] | None, dataset: Any,
                    config: Any, epoch: int | None = None, train_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, model_spec: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model`` (a Classifier, possibly compiled or DDP-wrapped) and its provenance.

    ``config`` may be a dict or a dataclass; ``train_state`` e.g. ``{"optimizer": opt.state_dict(),
    "scheduler": ..., "ema": ema.state_dict(), "rng": capture_rng_state()}``. ``model_spec`` describes a model
    that is no Classifier (a denoiser: ``models.denoisers.denoiser_spec``). Returns the path written.
    """
    m = unwrap_model(model)
    spec = model_spec if model_spec is not None else getattr(m, "spec", None)
    if not isinstance(spec, dict):
        raise TypeError(f"save_checkpoint needs a smoothtransfer Classifier (with .spec), got {type(m).__name__}")
    payload = to_weights_only({
        "format": FORMAT,
        "version": VERSION,
        "model_spec": copy.deepcopy(spec),
        "state_dict": m.state_dict(),
        "classes": None if classes is None else [str(c) for c in classes],
        "dataset": dataset,
        "config": config,
        "git_rev": git_revision(),
        "epoch": epoch,
        "train_state": train_state,
        "extra": extra,
        "smoothtransfer_version": __version__,
        "torch_version": torch.__version__,
    })
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = _write_failure(e)
        if reason is None:
            raise
        raise UserError(f"cannot write checkpoint {path}: {reason}; the previous file there, if any, is "
                        "unchanged") from None
    return path


def _write_failure(e: BaseException) -> str | None:
    """Why writing failed, for a read-only or full disk (torch's own writer reports a full disk as
    ``RuntimeError: [enforce fail at inline_container.cc:...] ... file write failed`` / ``unexpected pos``);
    None for any other error."""
    if isinstance(e, OSError):
        return (e.strerror or str(e)) if e.errno in WRITE_ERRNOS else None
    if isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|enforce fail", str(e)):
        return f"the disk is full or the file system failed ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (``weights_only=True``; ``mmap``: the
    tensors are mapped, not read, until used — for reading a large checkpoint's train state).

    Raises UserError for a missing file, a file torch cannot read (truncated, corrupt, not a torch file),
    a file holding pickled Python objects, a foreign file (e.g. a plain state_dict), or a newer version.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise UserError(f"checkpoint path is not a file: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # any failure to read a user-supplied file is a problem with the file
        # A well-formed pickle of Python objects, not a damaged file. torch words it "Unsupported global:
        # GLOBAL x.y" or "Trying to load unsupported GLOBAL posix.system" depending on version and object.
        found = re.search(r"unsupported global[:\s]*(?:global\s+)?([\w.]+)?", str(e), re.IGNORECASE)
        if found:
            what = f" ({found.group(1)})" if found.group(1) else ""
            raise UserError(f"{p} refused: it would run code on load (only weights are loaded): it holds pickled "
                            f"Python objects{what}, not only tensors and plain data") from None
        raise UserError(f"{p} is not a readable torch checkpoint (truncated or corrupt?): {_first_line(e)}") \
            from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p} is not a smoothtransfer checkpoint (it holds a {type(ckpt).__name__})")
    if ckpt.get("format") != FORMAT:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            what = "a plain state_dict"
        else:
            what = f"a dict with keys {sorted(map(str, ckpt))[:6]}"
        hint = ""
        if "arch" in ckpt and "state_dict" in ckpt:  # locuslab/smoothing and the repositories reusing it
            hint = f"; if Cohen et al.'s code (or SmoothAdv, Consistency, CAT-RS) saved it, pass cohen:{p}"
        elif "net" in ckpt:
            hint = f"; if MACER's code saved it, pass macer:{p}"
        raise UserError(f"{p} is not a smoothtransfer checkpoint (it holds {what} without the "
                        f"'{FORMAT}' marker){hint}")
    version = ckpt.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{p} has an invalid checkpoint version {version!r}")
    if version > VERSION:
        raise UserError(f"{p} is checkpoint version {version}, written by a newer smoothtransfer; "
                        f"this one reads version {VERSION}: upgrade smoothtransfer")
    if not isinstance(ckpt.get("model_spec"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{p} is damaged: it lacks a model_spec or state_dict")
    return ckpt


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(Classifier in eval mode on device, checkpoint dict)`` from a checkpoint; UserError if unusable.

    ``path`` may also name a model trained elsewhere, ``FORMAT:LOCATION`` (``cohen:FILE``, ``macer:FILE``,
    ``hf-hub:timm/NAME``, ``local-dir:DIR``, ...; see :mod:`smoothtransfer.models.external`).
    """
    source = parse_source(path)
    if source is not None:
        model, info = load_external(source)
        return model.to(resolve_device(device) if isinstance(device, str) else device).eval(), info
    ckpt = load_checkpoint(path)
    try:
        model = build_from_spec(ckpt["model_spec"])
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    try:
        result = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatch
        raise UserError(f"{path}: weights do not fit the model spec: {_first_line(e)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path}: weights do not fit the model spec ({len(result.missing_keys)} missing, e.g. "
                        f"{result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, e.g. "
                        f"{result.unexpected_keys[:2]})")
    spec = ckpt["model_spec"]
    norm = model.normalize
    if not (torch.allclose(norm.mean.flatten(), torch.tensor(spec["mean"], dtype=torch.float32))
            and torch.allclose(norm.std.flatten(), torch.tensor(spec["std"], dtype=torch.float32))):
        raise UserError(f"{path}: the input normalisation in the weights differs from the model spec")
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), ckpt
