"""Optional dependencies, imported where a feature needs them.

The core install (``pip install smoothtransfer``) certifies and trains; diffusers, peft and tensorboard come
with the extras ``[diffusion]``, ``[lora]`` and ``[tensorboard]`` (``[all]`` for every one). Each is
imported at its use site through :func:`require`, never at module level, so that a user who only certifies
neither installs nor imports them, and a missing one stops the feature with one line naming the command to
run (a :class:`~smoothtransfer.errors.UserError`, which the CLI prints as ``error: <line>``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from smoothtransfer.errors import UserError

#: import name -> (pip distribution, extra of smoothtransfer that installs it)
EXTRAS = {
    "diffusers": ("diffusers", "diffusion"),
    "peft": ("peft", "lora"),
    "tensorboard": ("tensorboard", "tensorboard"),
}


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it.

    Also an ``ImportError``, so code that treats a missing module as "feature unavailable" keeps working.
    """


def install_hint(module: str) -> str:
    """``pip install "smoothtransfer[<extra>]"`` for an import name of :data:`EXTRAS`."""
    top = module.split(".")[0]
    _dist, extra = EXTRAS[top]
    return f'pip install "smoothtransfer[{extra}]"'


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"diffusers"`` or ``"peft.tuners.lora"``) for ``feature``, or raise
    :class:`MissingExtra` with one line: what needs it and the ``pip install`` to run."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if top not in EXTRAS or (e.name or "").split(".")[0] != top:
            raise  # a broken installation of something else: keep the real traceback
        dist, _extra = EXTRAS[top]
        raise MissingExtra(f"{feature} needs {dist}, which is not installed: {install_hint(module)}") from None
