"""User-facing errors.

Every problem caused by bad input (a missing file, an unknown name, an out-of-range value) raises
:class:`UserError` with a one-line message naming the problem. The CLI prints ``error: <message>`` and
exits with status 2, before any work that could overwrite results has started.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit status 2."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
