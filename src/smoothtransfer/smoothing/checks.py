"""The abstain label and the argument checks shared by :mod:`.smooth` and :mod:`.sequential`.

They sit below both, so :class:`~smoothtransfer.smoothing.smooth.Smooth` can offer
:meth:`~smoothtransfer.smoothing.smooth.Smooth.certify_sequential` without an import circle.
"""

from __future__ import annotations

import operator
from typing import Any

from smoothtransfer.errors import UserError

__all__ = ["ABSTAIN", "check_alpha", "positive_int"]

#: Returned as the prediction when the smoothed classifier abstains.
ABSTAIN = -1


def positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int >= 1`` (integers only, no floats or strings); UserError naming ``name`` otherwise."""
    try:
        v = operator.index(value)
    except TypeError:
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise UserError(f"{name} must be a positive integer, got {v}")
    return v


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float strictly between 0 and 1; UserError otherwise."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < a < 1.0:
        raise UserError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return a
