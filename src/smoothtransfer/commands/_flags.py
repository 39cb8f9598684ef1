"""Command-line flags generated from a job config's fields (:mod:`smoothtransfer.job_configs`): the names,
types, defaults, choices and help of ``certify``, ``predict``, ``attack``, ``noise-profile``,
``train-denoiser`` and ``report`` all come from their config dataclass, so a flag and the key it sets cannot
drift apart."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from smoothtransfer.config import flag, type_text

C = TypeVar("C")
_SCALARS = {"int": int, "float": float, "str": str}


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag (or positional argument) per field of ``cls``, ``dest`` = the field name."""
    groups: dict[str, Any] = {}
    for f in fields(cls):
        meta = f.metadata
        text = type_text(f).replace(" | None", "")
        kw: dict[str, Any] = {"help": meta.get("help")}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kw["choices"] = list(meta["choices"])
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else f.default
        if text == "bool":
            kw["action"] = "store_false" if default else "store_true"
        else:
            if text.startswith("tuple["):
                kw["nargs"] = "+"
                text = text[len("tuple["):].split(",")[0].strip().rstrip("]")
                default = list(default) if default is not None else None
            kw["type"] = meta.get("argtype") or _SCALARS.get(text, str)
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
