"""The ``matrix`` construct of experiment grids: one ``runs:`` entry that stands for a product of settings.

A grid's ``runs:`` entry with a ``matrix:`` key is a template; it expands, in its place, into one run per
combination of the values of its axes::

    runs:
      ft-{pre}-{ft}-{mode}:              # the run id: a format string over the axes
        stage: finetune
        init: pre-{pre}                  # every string of the template is a format string
        label: "{pre.text} → {ft.text}, {mode}"
        matrix:                          # the axes; the first is the outermost (the runs come in that order)
          mode: {full: {}, fixed: {set: {mode: fixed, optim: {lr: 0.005}}}}
          pre: {clean: {text: clean}, g025: {text: "σ=0.25"}, mixed: {text: mixed}}
          ft:
            clean: {text: clean}
            g025: {text: "σ=0.25", set: {objective: {name: gaussian, params: {sigma: 0.25}}}}
        per_run:                         # optional: more settings for single runs of the product, by id
          ft-clean-clean-full: {certify: {sigmas: [0.25, 0.5, 1.0]}}

- An axis maps each value (its id) to its *variables* (any keys but ``set``) and ``set``: run settings merged
  into the template for that value. A list ``[a, b]`` is values without variables or settings.
- ``{axis}`` is the value's id and ``{axis.var}`` one of its variables (format specs work: ``{s.sigma:g}``),
  in the entry's key and in every string of the template (the entry less ``matrix`` and ``per_run``). A
  string that is exactly one placeholder becomes the variable itself, so ``sigma: "{s.sigma}"`` stays a
  number. ``{{`` and ``}}`` are literal braces.
- A run = the formatted template, deep-merged with each axis value's ``set`` in axis order, then with
  ``per_run[id]``. It is then an ordinary run: a matrix only saves writing the runs out.
- Two runs with one id (from a matrix and another entry, or two combinations that format alike), a
  ``per_run`` id the product does not make, and a placeholder naming no axis or variable are UserErrors.
"""

from __future__ import annotations

import copy
import re
import string
from typing import Any

from smoothtransfer.errors import UserError

RESERVED = ("matrix", "per_run")
_ONE_PLACEHOLDER = re.compile(r"\{(\w+(?:\.\w+)?)\}")


def merge(a: dict, b: dict | None) -> dict:
    """``a`` updated with ``b``, mappings merged key by key (``b`` wins); neither is modified."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _Formatter(string.Formatter):
    """``{axis}`` → the value's id, ``{axis.var}`` → its variable; anything else is a UserError."""

    def __init__(self, combo: dict[str, tuple[str, dict]], where: str) -> None:
        self.combo, self.where = combo, where

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        return self.lookup(field_name), field_name

    def lookup(self, field_name: str) -> Any:
        axis, _, var = field_name.partition(".")
        if axis not in self.combo:
            raise UserError(f"{self.where}: '{{{field_name}}}' names no axis of the matrix "
                            f"({', '.join(self.combo)})")
        ident, variables = self.combo[axis]
        if not var:
            return ident
        if var not in variables:
            raise UserError(f"{self.where}: '{{{field_name}}}': value '{ident}' of axis '{axis}' has no variable "
                            f"'{var}'")
        return variables[var]

    def text(self, s: str) -> Any:
        whole = _ONE_PLACEHOLDER.fullmatch(s)
        if whole:
            return self.lookup(whole.group(1))
        try:
            return self.format(s)
        except (ValueError, IndexError) as e:
            raise UserError(f"{self.where}: bad format string {s!r} ({e})") from None

    def fill(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, dict):
            return {k: self.fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.fill(v) for v in node]
        return node


def _axes(matrix: Any, where: str) -> list[tuple[str, list[tuple[str, dict, dict]]]]:
    """``[(axis, [(value id, variables, settings), ...]), ...]`` of a ``matrix:`` block, checked."""
    if not isinstance(matrix, dict) or not matrix:
        raise UserError(f"{where}: matrix must map axis names to their values, got {matrix!r}")
    axes = []
    for axis, values in matrix.items():
        if not re.fullmatch(r"\w+", str(axis)):
            raise UserError(f"{where}: matrix axis name '{axis}' must be letters, digits or _")
        if isinstance(values, list):
            values = {v: {} for v in values}
        if not isinstance(values, dict) or not values:
            raise UserError(f"{where}: matrix axis '{axis}' must map value ids to their variables (or list the "
                            f"ids), got {values!r}")
        items = []
        for ident, body in values.items():
            body = {} if body is None else body
            if not isinstance(body, dict) or not isinstance(body.get("set") or {}, dict):
                raise UserError(f"{where}: value '{ident}' of matrix axis '{axis}' must be a mapping of "
                                f"variables and 'set: {{run settings}}', got {body!r}")
            items.append((str(ident), {k: v for k, v in body.items() if k != "set"}, body.get("set") or {}))
        axes.append((str(axis), items))
    return axes


def expand_matrix(key: str, entry: dict, where: str) -> dict[str, dict]:
    """The runs (id → run spec) one matrix entry ``key: entry`` stands for, in product order."""
    where = f"{where} matrix '{key}'"
    axes = _axes(entry.get("matrix"), where)
    per_run = entry.get("per_run") or {}
    if not isinstance(per_run, dict):
        raise UserError(f"{where}: per_run must map run ids to settings, got {per_run!r}")
    template = {k: v for k, v in entry.items() if k not in RESERVED}
    combos: list[list[tuple[str, tuple[str, dict, dict]]]] = [[]]
    for axis, values in axes:
        combos = [c + [(axis, v)] for c in combos for v in values]
    out: dict[str, dict] = {}
    for combo in combos:
        fmt = _Formatter({axis: (ident, variables) for axis, (ident, variables, _) in combo}, where)
        rid = fmt.text(key)
        if not isinstance(rid, str):
            raise UserError(f"{where}: the run id must be text, got {rid!r}")
        if rid in out:
            raise UserError(f"{where}: two combinations make the run id '{rid}'; put every axis in the id")
        run = fmt.fill(template)
        for _, (_, _, settings) in combo:
            run = merge(run, settings)
        out[rid] = merge(run, per_run.get(rid))
    unknown = [rid for rid in per_run if rid not in out]
    if unknown:
        raise UserError(f"{where}: per_run names '{unknown[0]}', which is not a run of this matrix")
    return out


def expand_runs(runs: dict, where: str) -> dict[str, Any]:
    """A grid's ``runs:`` with every matrix entry replaced, in its place, by the runs it stands for; a run id
    made twice is a UserError naming it and the entries that make it."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, entry in runs.items():
        made = expand_matrix(str(key), entry, where) if isinstance(entry, dict) and "matrix" in entry else {key: entry}
        for rid, run in made.items():
            if rid in out:
                raise UserError(f"run '{rid}' in {where} is defined twice: by '{origin[rid]}' and by '{key}'")
            out[rid], origin[rid] = run, str(key)
    return out
