"""Command-line flags generated from a config's fields, so a flag and the key it sets cannot drift apart.

- the job configs (:mod:`smoothtransfer.job_configs`): every field of ``certify``, ``predict``, ``attack``,
  ``noise-profile``, ``train-denoiser`` and ``report`` is a flag (:func:`add_config_arguments`);
- :class:`~smoothtransfer.config.TrainConfig`: the fields declared with ``opt`` (in its sections too) are the
  flags of ``pretrain`` and ``finetune``, each setting one dotted key (``--model`` → ``model.arch``,
  ``--sigma`` → ``objective.params.sigma``); they override ``--config`` and are overridden by ``--set``
  (:func:`add_train_arguments`, :func:`train_overrides`).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from typing import Any, NamedTuple, TypeVar

import yaml

from smoothtransfer.config import TrainConfig, flag, flag_fields, type_text
from smoothtransfer.errors import UserError

C = TypeVar("C")
_SCALARS = {"int": int, "float": float, "str": str}


def _value_kwargs(f: Field, default: Any) -> tuple[dict[str, Any], Any]:
    """argparse keywords for the value(s) of field ``f`` (type, nargs, bool action, choices, metavar, help)
    and the default to give the parser (a tuple default becomes a list, as argparse returns one)."""
    meta = f.metadata
    text = type_text(f).replace(" | None", "")
    kw: dict[str, Any] = {"help": meta.get("help")}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kw["choices"] = list(meta["choices"])
    if text == "bool":
        kw["action"] = "store_false" if f.default else "store_true"
        return kw, default
    if text.startswith("tuple["):
        kw["nargs"] = "+"
        text = text[len("tuple["):].split(",")[0].strip().rstrip("]")
        default = list(default) if isinstance(default, tuple) else default
    kw["type"] = meta.get("argtype") or _SCALARS.get(text, str)
    return kw, default


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag (or positional argument) per field of job config ``cls``, ``dest`` = the field name."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        required = f.default is MISSING and f.default_factory is MISSING
        kw, default = _value_kwargs(f, None if required else f.default)
        target = p
        if meta.get("group"):
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        if meta.get("positional"):
            target.add_argument(f.name, **kw)
            continue
        target.add_argument(*(meta.get("flags") or (flag(cls, f.name),)), dest=f.name, default=default,
                            **({"required": True} if required else {}), **kw)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config of ``cls`` the parsed ``args`` describe (not yet validated)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------ pretrain, finetune


class TrainFlag(NamedTuple):
    """One flag of ``pretrain``/``finetune``: it sets TrainConfig key ``key`` (``generic``: keys below ``key``,
    ``--param K=V`` → ``key.K``); parsed into ``args.<dest>``."""

    flag: str
    dest: str
    key: str
    kwargs: dict
    generic: bool = False


def train_flags(stage: str) -> list[TrainFlag]:
    """The flags of the ``stage`` command (pretrain or finetune), in TrainConfig's field order. Every one
    defaults to None (empty for ``--param``): a flag not given leaves the key to ``--config`` or the default."""
    out: list[TrainFlag] = []
    for key, f in flag_fields(TrainConfig):
        meta = f.metadata
        if meta.get("stages") and stage not in meta["stages"]:
            continue
        for pf in meta.get("params") or ():  # flags that set keys of a dict field (objective.params)
            if pf.key is None:
                out.append(TrainFlag(pf.flag, key.replace(".", "_"), key,
                                     {"action": "append", "default": [], "metavar": "KEY=VALUE", "help": pf.help},
                                     generic=True))
            else:
                kw = {"type": pf.type, "help": pf.help, **({"nargs": "+"} if pf.many else {})}
                out.append(TrainFlag(pf.flag, pf.flag.lstrip("-").replace("-", "_"), f"{key}.{pf.key}", kw))
        if meta.get("params"):
            continue
        kw, _ = _value_kwargs(f, None)
        name = (meta.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
        kw.update(default=None, **({"required": True} if meta.get("required") else {}))
        out.append(TrainFlag(name, name.lstrip("-").replace("-", "_"), key, kw))
    return out


def add_train_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """The TrainConfig flags of ``pretrain``/``finetune`` (see :func:`train_flags`)."""
    for fl in train_flags(stage):
        p.add_argument(fl.flag, dest=fl.dest, **fl.kwargs)


def train_overrides(args: argparse.Namespace, stage: str) -> list[str]:
    """The given flags as dotted overrides (``model.arch=resnet20``), values written as YAML, in flag order."""
    out: list[str] = []
    for fl in train_flags(stage):
        value = getattr(args, fl.dest)
        if fl.generic:
            for item in value:
                if "=" not in item:
                    raise UserError(f"{fl.flag} '{item}' must look like key=value")
                out.append(f"{fl.key}.{item}")
        elif value is not None:
            out.append(f"{fl.key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return out


def parse_jobs(text: str) -> int:
    """``--jobs``: a positive integer or ``auto`` (0)."""
    if text == "auto":
        return 0
    try:
        j = int(text)
    except ValueError:
        j = 0
    if j < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got '{text}'")
    return j
