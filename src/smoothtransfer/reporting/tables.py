"""Paper-style tables of certification results: ``(clean)certified`` cells, one row per run and sigma.

Certified accuracy at radius ``r`` and ACR are recomputed from the per-image TSV rows (see
:mod:`smoothtransfer.evaluation.metrics`), so any radii can be tabulated. The parenthesised value in a cell
is the smoothed classifier's clean accuracy (certified accuracy at ``r = 0`` from CERTIFY, abstentions
wrong), as in Salman et al. (2019) and Carlini et al. (2023). Every sigma is reported separately at its own
level alpha: no best-over-sigma selection (DESIGN rule 5).

Rendering only: the results are read by :func:`smoothtransfer.smoothing.results.load_run` (our result
directories and Cohen et al.'s raw ``certify.py`` output), re-exported here with ``Run``, ``SigmaResult`` and
``read_tsv`` for the code that imports them from this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from smoothtransfer.smoothing.results import Run, SigmaResult, load_run, read_tsv

__all__ = ["CAP_NOTE", "DEFAULT_RADII", "TABLE_NOTE", "Run", "SigmaResult", "cap_mark", "certified_rows",
           "certified_table", "format_cell", "load_run", "markdown_table", "radius_label", "read_tsv"]

DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------------------- formatting


def _pct(x: float, digits: int) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def format_cell(clean: float, cert: float, digits: int = 1) -> str:
    """Paper-style cell from two fractions in [0,1]: ``format_cell(0.72, 0.45) == "(72.0)45.0"``."""
    return f"({_pct(clean, digits)}){_pct(cert, digits)}"


def _fmt_num(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def radius_label(r: float) -> str:
    """Column name of a radius: ``0.25``, ``0.5``, ``1.0``."""
    return f"{r:g}" if r != int(r) else f"{r:.1f}"


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], align: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts) restricted to ``columns``, padded for plain-text reading.

    ``align`` gives ``"l"``/``"r"`` per column (default: left for the first column, right for the others).
    Missing values render as ``–``.
    """
    rows = list(rows)
    align = list(align) if align else ["l"] + ["r"] * (len(columns) - 1)
    cells = [[str(c) for c in columns]] + [[_fmt_num(r.get(c)) for c in columns] for r in rows]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(columns))]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(vals, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep, *(line(c) for c in cells[1:])]) + "\n"


CAP_NOTE = "† = beyond the largest radius N samples can certify at this σ and α (σ·Φ⁻¹(α^(1/N)))."


def cap_mark(radius: float, cap: float | None) -> str:
    """"†" when ``radius`` is beyond ``cap``, the largest radius N samples can certify (DESIGN rule 4)."""
    return "†" if cap is not None and float(radius) > float(cap) else ""


def certified_rows(runs: Sequence[Run], radii: Sequence[float] = DEFAULT_RADII, digits: int = 1) -> list[dict[str, Any]]:
    """One table row per (run, sigma): ``run``, ``σ``, ``N``, ``n0``, ``α``, ``images`` (done/selected),
    one ``(clean)cert`` cell per radius (keyed by :func:`radius_label`), ``ACR`` and ``abstain``.
    """
    rows = []
    for run in runs:
        for res in run.results:
            side = res.sidecar
            row: dict[str, Any] = {
                "run": run.name,
                "σ": res.sigma,
                "N": side.get("n"),
                "n0": side.get("n0"),
                "α": side.get("alpha"),
                "images": (f"{res.num_done}" if res.num_done == res.num_images
                           else f"{res.num_done}/{res.num_images}"),
            }
            clean = res.clean_accuracy
            cap = res.max_certifiable_radius
            for r, a in zip(radii, res.certified_accuracy(radii)):
                row[radius_label(r)] = format_cell(clean, float(a), digits) + cap_mark(r, cap)
            row["ACR"] = "–" if not math.isfinite(res.acr) else f"{res.acr:.3f}"
            row["abstain"] = _pct(res.abstain_rate, digits)
            rows.append(row)
    return rows


def certified_table(runs: Sequence[Run], radii: Sequence[float] = DEFAULT_RADII, digits: int = 1) -> str:
    """Markdown table of :func:`certified_rows`: columns run, σ, N, α, images, radii..., ACR."""
    columns = ["run", "σ", "N", "α", "images", *[radius_label(r) for r in radii], "ACR"]
    return markdown_table(certified_rows(runs, radii, digits), columns)


TABLE_NOTE = (
    "Cells: (smoothed clean accuracy) certified accuracy at the L2 radius of the column, in %. Clean accuracy is "
    "the certified accuracy at radius 0 from CERTIFY (abstentions count as wrong). Each σ is certified and "
    "reported separately at level α with N estimation samples (no best-over-σ selection). ACR = average "
    "certified radius (radius × correct, averaged over all images). Radii are in [0,1] pixel units. "
    + CAP_NOTE
)
