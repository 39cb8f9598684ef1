"""Experiment configuration: frozen dataclasses, YAML load/dump and dotted overrides (``optim.lr=0.01``).

A :class:`TrainConfig` fully describes one pre-training or fine-tuning run; it is resolved before any work
starts (unknown keys and bad values are UserErrors naming the key) and saved in the run directory and the
checkpoint, so every run is self-describing. Its fields declared with :func:`opt` carry their command-line
flag (help, spelling, choices): ``pretrain``/``finetune`` generate their flags from them.

Longer than 400 lines because each TrainConfig field keeps its flag's help text beside it (one place for a
key and its flag), and the helpers every typed config shares (``opt``, ``JobConfig``, coercion) live here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import yaml

from smoothtransfer.errors import UserError

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
#: fine-tuning modes: what is trained. full = every weight; fixed = only the new last FC layer (the backbone is
#: frozen, its norm statistics too: DESIGN rule 9); lora = LoRA adapters + the new head
MODES = ("full", "fixed", "lora")
#: other names accepted for a mode, normalised when a TrainConfig is built (a run's config says the mode)
MODE_ALIASES = {"head": "fixed"}
#: what ``--mode`` accepts: each mode followed by its aliases (full, fixed, head, lora)
MODE_CHOICES = tuple(n for m in MODES for n in (m, *(a for a, t in MODE_ALIASES.items() if t == m)))
#: the norms of ``models.norms.NORMS`` (listed here so that ``--help`` needs no torch; a test keeps them equal)
NORM_CHOICES = ("batch", "group", "layer", "instance")
OPTIMIZERS = ("sgd", "adamw")
SELECT_CHOICES = ("last", "best")


# ----------------------------------------------------------------------------------------------------
# command-line flags as field metadata


class ParamFlag(NamedTuple):
    """A flag that sets one key of a dict field (``--sigma`` → ``objective.params.sigma``); ``key=None`` is the
    generic, repeatable ``--param KEY=VALUE``. ``many``: the flag takes one or more values (a list)."""

    flag: str
    key: str | None
    help: str
    type: Any = float
    many: bool = False


def opt(default: Any = MISSING, *, help: str | None = None, flags: tuple[str, ...] | None = None,
        metavar: str | None = None, choices: tuple | None = None, positional: bool = False, group: str | None = None,
        argtype: Any = None, default_factory: Any = MISSING, params: tuple[ParamFlag, ...] | None = None,
        stages: tuple[str, ...] | None = None, required: bool = False) -> Any:
    """A config field with what its command-line flag needs: ``help``, its spellings (``flags``; default
    ``--name-with-dashes``), ``metavar``, ``choices``, ``positional``, the ``--help`` ``group`` it is listed in and
    the parser's ``argtype`` where the type hint does not say (e.g. ``--workers auto|W``). The flags of
    every command are generated from these (``smoothtransfer.commands._flags``): every field of a job config
    (``job_configs.py``) is a flag; a field of :class:`TrainConfig` (or of its sections) is one only when it
    is declared with ``opt``, and then only in the commands of ``stages`` (None: pretrain and finetune;
    ``required``: the flag must be given there); ``params`` are flags that set keys of a dict field."""
    meta = {"help": help, "flags": flags, "metavar": metavar, "choices": choices, "positional": positional,
            "group": group, "argtype": argtype, "params": params, "stages": stages, "required": required}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------
# training configs

@dataclass(frozen=True)
class DataConfig:
    """Which images a run trains on, and how the held-out validation split is drawn."""

    dataset: str = opt("cifar10", help="dataset name (cifar10, tiny-imagenet-32, eurosat-32, imagefolder:PATH, ...)")
    split: str = "train"
    data_root: str | None = opt(None, help="folder holding the dataset zips (default: $SMOOTHTRANSFER_DATA or "
                                           "../shared/datasets)")
    #: fraction of the training split held out for model selection (never the test set, rule 8)
    val_fraction: float = opt(0.1, help="fraction of the training split held out for validation")
    #: k images per class drawn with ``seed`` (low-data fine-tuning); None = all
    shots_per_class: int | None = opt(None, help="k images per class (low-data fine-tuning)")
    #: cap on the training images after the split (a fixed random subset); None = all
    max_train: int | None = opt(None, help="train on a fixed random subset of this many images")
    #: keep only the first K classes (sorted class order), e.g. a 20-class upstream task on 2 CPU cores
    max_classes: int | None = None
    #: cap on validation images; None = all
    max_val: int | None = 2000
    augment: str = "crop_flip"
    download: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; None means the default when pre-training (resnet20, the model's default norm: batch for
    CNNs, layer for ViTs) and the checkpoint's own when fine-tuning (a different value is then an error)."""

    arch: str | None = opt(None, flags=("--model",),
                           help="architecture (resnet20, resnet110, resnet50, vit_tiny_patch4_32, ...)")
    norm: str | None = opt(None, choices=NORM_CHOICES,
                           help="normalisation layers of a CNN (default batch; ViTs: layer). group = GroupNorm with "
                                "the largest divisor of C that is <= min(32, C/4) groups: >= 4 channels per group on "
                                "narrow layers (16 channels: 4 groups), 32 groups from C = 128; layer = one group; "
                                "instance = one channel per group")
    pretrained: bool = False
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = opt("clean", flags=("--objective",),
                    help="clean, gaussian, mixed, consistency, smoothadv, macer, adversarial, simclr, ftcadis")
    params: dict = opt(default_factory=dict, params=(
        ParamFlag("--sigma", "sigma", "noise level σ of the objective (gaussian, consistency, ...)"),
        ParamFlag("--sigmas", "sigmas", "σ set S of the mixed objective, e.g. 0 0.25 0.5 1.0", many=True),
        ParamFlag("--param", None, "another objective parameter, e.g. --param m=2 (repeatable)")))


@dataclass(frozen=True)
class OptimConfig:
    name: str = opt("sgd", flags=("--optimizer",), choices=OPTIMIZERS)
    lr: float = opt(0.1)
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple = (0.9, 0.999)
    weight_decay: float = opt(5e-4)
    #: learning-rate multiplier for the (fresh) classification head when fine-tuning
    head_lr_mult: float = 1.0
    warmup_epochs: float = opt(0.0)
    schedule: str = "cosine"
    grad_clip: float | None = opt(None)
    #: EMA decay of the weights (e.g. 0.999); None disables EMA
    ema: float | None = opt(None, help="EMA decay of the weights, e.g. 0.999")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (``stage`` pretrain or finetune)."""

    stage: str = "pretrain"
    out: str = opt("runs/train", help="run directory")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = opt(1)
    batch_size: int = opt(128)
    eval_batch_size: int = 512
    #: fine-tuning: checkpoint to start from, and what is trained (MODES; "head" is an alias of "fixed")
    init: str | None = opt(None, stages=("finetune",), required=True,
                           help="pre-trained checkpoint.pt to start from, or a model trained elsewhere: cohen:FILE, "
                                "hf-hub:ORG/NAME, local-dir:DIR, ... (see certify --help)")
    mode: str = opt("full", stages=("finetune",), choices=MODE_CHOICES,
                    help="what is trained (default full). full: every weight (backbone, norm layers, new head); "
                         "fixed: only the new last FC layer, the backbone frozen with its norm statistics "
                         "(BatchNorm stays in eval mode); head: the same as fixed (an alias, recorded as "
                         "fixed); lora: LoRA adapters + the new head, every other weight frozen")
    #: fine-tuning on the checkpoint's own classes (e.g. FT-CADIS on an off-the-shelf CIFAR-10 classifier):
    #: keep its trained head instead of a fresh one
    keep_head: bool = False
    lora_rank: int = opt(4, stages=("finetune",))
    lora_alpha: float = opt(4.0, stages=("finetune",))
    #: denoiser directory (FT-CADIS fine-tuning through a denoiser)
    denoiser: str | None = opt(None, stages=("finetune",),
                               help="denoiser directory (FT-CADIS: fine-tune through the denoiser)")
    #: validation accuracy is also measured under Gaussian noise at these σ
    eval_sigmas: tuple[float, ...] = opt((0.25,), help="σ for noisy validation accuracy")
    #: which checkpoint ``checkpoint.pt`` holds at the end: the last epoch or the best on validation
    select: str = opt("last", choices=SELECT_CHOICES,
                      help="final checkpoint: last epoch or best on validation")
    amp: str = opt("auto", choices=AMP_CHOICES)
    #: torch.compile the model for training and validation (nn.Module.compile: the weights and checkpoints stay
    #: those of the plain model). Why: on CPU, ResNet-20 steps under bf16 autocast ran 1.5-1.6x faster
    #: compiled (benchmarks/train_throughput.py), after one to two minutes of compiling at the start of a run.
    compile: bool = opt(False, help="torch.compile the model (faster steps after 1-2 min of compiling; "
                                    "benchmarks/train_throughput.py measures it)")
    device: str = opt("auto", help="auto | cpu | cuda")
    seed: int = opt(0)
    #: also checkpoint every this many steps inside an epoch (0: only at epoch ends)
    checkpoint_every: int = 200
    threads: int | None = opt(None, help="torch CPU threads")
    tensorboard: bool = True
    progress: bool = opt(True, flags=("--no-progress",))

    def __post_init__(self) -> None:
        # "head" (last-layer fine-tuning) is "fixed": one name in configs, checkpoints and run directories
        if self.mode in MODE_ALIASES:
            object.__setattr__(self, "mode", MODE_ALIASES[self.mode])

    def validate(self) -> TrainConfig:
        """Check value ranges; returns self. Raises UserError naming the bad key."""
        _check(self.stage in ("pretrain", "finetune"), f"stage must be pretrain or finetune, got '{self.stage}'")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.mode in MODES, f"mode must be one of {', '.join(MODES)} (head = fixed), got '{self.mode}'")
        _check(self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got '{self.amp}'")
        _check(self.select in SELECT_CHOICES, f"select must be last or best, got '{self.select}'")
        _check(0.0 <= self.data.val_fraction < 1.0, f"data.val_fraction must be in [0,1), got {self.data.val_fraction}")
        _check(self.data.shots_per_class is None or self.data.shots_per_class >= 1,
               f"data.shots_per_class must be >= 1, got {self.data.shots_per_class}")
        _check(self.data.max_classes is None or self.data.max_classes >= 2,
               f"data.max_classes must be >= 2, got {self.data.max_classes}")
        _check(self.optim.name in OPTIMIZERS, f"optim.name must be sgd or adamw, got '{self.optim.name}'")
        _check(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        _check(self.optim.schedule in ("cosine", "constant", "step"),
               f"optim.schedule must be cosine, constant or step, got '{self.optim.schedule}'")
        _check(self.optim.ema is None or 0.0 < self.optim.ema < 1.0, f"optim.ema must be in (0,1), got {self.optim.ema}")
        _check(all(s > 0 for s in self.eval_sigmas), f"eval_sigmas must be > 0, got {list(self.eval_sigmas)}")
        if self.stage == "finetune":
            _check(self.init is not None, "finetune needs init: the checkpoint to start from (--init)")
        return self


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> Any:
    """A plain (YAML/JSON-able) dict of a config dataclass; tuples become lists."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; an unknown key is a UserError naming it (typo-safe)."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, sorted(names), n=1)
        hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
        raise UserError(f"unknown config key '{where}{k}'{hint}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        ftype = hints[f.name]
        if is_dataclass(ftype):
            if not isinstance(value, dict):
                raise UserError(f"config key '{where}{f.name}' must be a mapping, got {value!r}")
            value = from_dict(ftype, value, where=f"{where}{f.name}.")
        else:
            value = _coerce(value, ftype, f"{where}{f.name}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _coerce(value: Any, ftype: Any, key: str) -> Any:
    """Light type coercion for YAML / command-line values (``"0.1"`` → 0.1, lists → tuples)."""
    text = str(ftype)
    if value is None:
        return None
    if isinstance(value, list) and ("tuple" in text):
        return tuple(value)
    if text in ("float", "float | None") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if text in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if text in ("float", "float | None") and not isinstance(value, (int, float)):
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if text == "bool" and not isinstance(value, bool):
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if text in ("str", "str | None") and not isinstance(value, str):
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}': '{p}' is not a mapping")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict | None = None) -> TrainConfig:
    """Resolve a TrainConfig from an optional base dict, a YAML file and dotted overrides."""
    data: dict = dict(base or {})
    if path is not None:
        data = _deep_merge(data, load_yaml(path))
    data = apply_overrides(data, overrides or [])
    return from_dict(TrainConfig, data).validate()


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


# ----------------------------------------------------------------------------------------------------
# typed job configs (certify, predict, attack, noise profile, denoiser training, report): see job_configs.py


def flag(cls: Any, name: str) -> str:
    """How the command line spells field ``name`` of job config ``cls`` (``sigmas`` of certify: ``--sigma``);
    error messages name a bad key this way, the same words for a command-line and a Python user."""
    f = {f.name: f for f in fields(cls)}[name]
    if f.metadata.get("positional"):
        return name
    return (f.metadata.get("flags") or ("--" + name.replace("_", "-"),))[0]


def flag_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every field of ``cls`` declared with :func:`opt`, in declaration order, with the
    fields of a section (a dataclass-typed field) in its place: for TrainConfig ``("out", …)``,
    ``("data.dataset", …)``, …, ``("model.arch", …)``. The ``pretrain``/``finetune`` flags are these."""
    hints = get_type_hints(cls)
    out: list[tuple[str, dataclasses.Field]] = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out += flag_fields(hints[f.name], f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            out.append((prefix + f.name, f))
    return out


class JobConfig:
    """Base of the frozen job-config dataclasses: values are coerced to the field types when the config is
    built (``0`` → ``0.0`` for a float, a list or a single number → a tuple, a ``Path`` → its string), as the
    command line's parser does, so a config from Python, YAML or flags writes the same result files.
    ``validate()`` checks ranges and returns the config to use (defaults that depend on other keys filled in);
    a bad value is a UserError naming the key as its flag."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce_job(getattr(self, f.name), type_text(f), flag(type(self), f.name))
            object.__setattr__(self, f.name, value)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict:
        return to_dict(self)

    def _flag(self, name: str) -> str:
        return flag(type(self), name)


def type_text(f: dataclasses.Field) -> str:
    """A field's annotation as written (``"tuple[float, ...] | None"``; modules here use postponed annotations)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _coerce_job(value: Any, hint: str, key: str) -> Any:
    if value is None:
        if "None" not in hint:
            raise UserError(f"{key} must be given")
        return None
    base = hint.replace(" | None", "")
    if base.startswith("tuple["):
        elem = base[len("tuple["):].split(",")[0].strip().rstrip("]")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce_job(v, elem, key) for v in items)
    if base == "float":
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{key} must be a number, got {value!r}")
    if base == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if base == "str":
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {value!r}")
    return value


def check_finite(value: float, key: str, *, low: float = 0.0, strict: bool = True) -> None:
    """UserError ``KEY must be > LOW, got V`` unless ``value`` is finite and above (or at, ``strict=False``) low."""
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    _check(ok, f"{key} must be {'>' if strict else '>='} {low:g}, got {value:g}")
