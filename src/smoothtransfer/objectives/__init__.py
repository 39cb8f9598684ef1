"""Training objectives, one file per family, all behind one interface (:mod:`.base`).

Importing this package registers every objective in :data:`OBJECTIVES`.
"""

import importlib as _importlib

for _name in ("adversarial", "clean", "consistency", "ftcadis", "gaussian", "macer", "mixed", "simclr",
              "smoothadv"):
    try:
        _importlib.import_module(f"smoothtransfer.objectives.{_name}")
    except ModuleNotFoundError as _e:  # TEMPORARY during development: module not written yet
        if _e.name != f"smoothtransfer.objectives.{_name}":
            raise
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput, build_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objective"]
