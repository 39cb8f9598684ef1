"""Moved to :mod:`smoothtransfer.models.checkpoint` (checkpoint I/O lives beside the models); this name keeps
old imports working."""

from smoothtransfer.models.checkpoint import *  # noqa: F403
from smoothtransfer.models.checkpoint import __all__  # noqa: F401
