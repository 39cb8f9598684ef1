"""Training objectives, one file per family, all behind one interface (:mod:`.base`).

Importing this package registers every objective in :data:`OBJECTIVES`.
"""

from smoothtransfer.objectives import (  # noqa: F401  (imported to register)
    adversarial,
    clean,
    consistency,
    ftcadis,
    gaussian,
    macer,
    mixed,
    simclr,
    smoothadv,
)
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput, build_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objective"]
