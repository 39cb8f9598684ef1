"""Paper-style tables of certification results: ``(clean)certified`` cells, one row per run and sigma.

Certified accuracy at radius ``r`` and ACR are recomputed from the per-image TSV rows (see
:mod:`smoothtransfer.evaluation.metrics`), so any radii can be tabulated. The parenthesised value in a cell
is the smoothed classifier's clean accuracy (certified accuracy at ``r = 0`` from CERTIFY, abstentions
wrong), as in Salman et al. (2019) and Carlini et al. (2023). Every sigma is reported separately at its own
level alpha: no best-over-sigma selection (DESIGN rule 5).

Loading (``read_tsv``, ``load_run``) accepts our result directories and Cohen et al.'s raw ``certify.py``
output files (``time`` as ``h:mm:ss.ffffff``, no sidecar; sigma is then parsed from the file name).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.metrics import abstain_rate, acr, certified_accuracy
from smoothtransfer.smoothing.stats import max_certifiable_radius

DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0)
_INT_COLUMNS = ("idx", "label", "predict", "correct", "count")
_NUMERIC_COLUMNS = (*_INT_COLUMNS, "time", "radius", "n_used", "p_lower")
_SIGMA_IN_NAME = re.compile(r"(?:sigma|noise)[_=-]?(\d+(?:\.\d+)?)")


# ------------------------------------------------------------------------------------------------ loading


def _seconds(value: str) -> float:
    """``"12.5"`` or Cohen's ``"0:00:12.500000"`` (``str(timedelta)``, maybe ``"1 day, 0:00:01"``) -> seconds."""
    try:
        return float(value)
    except ValueError:
        pass
    days = 0.0
    if "day" in value:
        d, value = value.split(",", 1)
        days = float(d.split()[0])
    parts = [float(p) for p in value.strip().split(":")]
    secs = 0.0
    for p in parts:
        secs = secs * 60 + p
    return days * 86400 + secs


def read_tsv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of a results TSV by header name: ``time`` in seconds (float64), other columns float64
    (``idx``, ``label``, ``predict``, ``correct``, ``count`` int64). A partial last line is ignored.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    # Only newline-terminated lines are complete rows: a run killed mid-write leaves a partial last line.
    # Any complete row that does not parse is refused with its line number (as certify refuses to resume
    # such a file): skipping it would silently change every number of the table.
    lines = [(no, ln.rstrip("\r")) for no, ln in enumerate(text.split("\n")[:-1], start=1) if ln.strip()]
    if not lines:
        raise UserError(f"{path} is empty, not a results TSV")
    header = lines[0][1].split("\t")
    if "correct" not in header and "predict" not in header:
        raise UserError(f"{path} is not a results TSV (header: {lines[0][1][:80]})")
    raw: dict[str, list[str]] = {h: [] for h in header}
    for no, line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserError(f"{path} line {no} has {len(fields)} fields, the header has {len(header)}: the file "
                            "is damaged; fix or delete that line (a partial last line without newline is ignored)")
        for h, v in zip(header, fields):
            raw[h].append(v)
    numbers = [no for no, _ in lines[1:]]
    cols: dict[str, np.ndarray] = {}
    for h, vals in raw.items():
        convert, dtype = {"time": (_seconds, np.float64)}.get(
            h, ((lambda v: int(float(v))), np.int64) if h in _INT_COLUMNS else (float, np.float64))
        out = []
        for no, v in zip(numbers, vals):
            try:
                out.append(convert(v))
            except ValueError:
                if h not in _NUMERIC_COLUMNS:  # a column of another tool's: kept as text
                    out = None
                    break
                raise UserError(f"{path} line {no}: {h} {v[:40]!r} is not a number; the file is damaged, fix or "
                                "delete that line") from None
        cols[h] = np.array(out, dtype=dtype) if out is not None else np.array(vals, dtype=object)
    return cols


@dataclass
class SigmaResult:
    """The certificates of one run at one noise level: TSV columns ``(N,)`` + sidecar settings."""

    sigma: float | None
    columns: dict[str, np.ndarray]
    sidecar: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def radii(self) -> np.ndarray:
        return self.columns.get("radius", np.zeros(self.num_done))

    @property
    def correct(self) -> np.ndarray:
        return self.columns["correct"]

    @property
    def predictions(self) -> np.ndarray:
        return self.columns["predict"]

    @property
    def num_done(self) -> int:
        return int(len(self.columns.get("correct", ())))

    @property
    def num_images(self) -> int:
        """Images selected for the run (``num_done`` when the sidecar does not say)."""
        return int(self.sidecar.get("num_images", self.num_done))

    def certified_accuracy(self, radii: Sequence[float]) -> np.ndarray:
        """``(R,)`` certified accuracy (fraction) at each radius."""
        return certified_accuracy(self.radii, self.correct, list(radii))

    @property
    def clean_accuracy(self) -> float:
        return float(certified_accuracy(self.radii, self.correct, [0.0])[0])

    @property
    def max_certifiable_radius(self) -> float:
        """The largest radius ``n`` samples can certify at this sigma and alpha (inf without a sidecar)."""
        n, alpha = self.sidecar.get("n"), self.sidecar.get("alpha")
        if self.sigma is None or n is None or alpha is None:
            return math.inf
        return float(max_certifiable_radius(self.sigma, n, alpha))

    @property
    def acr(self) -> float:
        return acr(self.radii, self.correct)

    @property
    def abstain_rate(self) -> float:
        return abstain_rate(self.predictions)


@dataclass
class Run:
    """One result directory (or one TSV file): a name and its per-sigma results, sorted by sigma."""

    name: str
    path: Path
    results: list[SigmaResult]


def _sigma_from_name(name: str) -> float | None:
    m = _SIGMA_IN_NAME.search(name)
    return float(m.group(1)) if m else None


def _merge_shards(results: list[SigmaResult]) -> list[SigmaResult]:
    """One result per sigma from the ``.shard<k>of<K>`` files of a sharded run (rows sorted by ``idx``)."""
    merged: list[SigmaResult] = []
    shards: dict[float, list[SigmaResult]] = {}
    for res in results:
        if int(res.sidecar.get("num_shards", 1)) > 1 and res.sigma is not None:
            shards.setdefault(res.sigma, []).append(res)
        else:
            merged.append(res)
    for sigma, parts in shards.items():
        keys = set.intersection(*(set(p.columns) for p in parts))
        cols = {k: np.concatenate([p.columns[k] for p in parts]) for k in keys}
        if "idx" in cols:
            order = np.argsort(cols["idx"], kind="stable")
            cols = {k: v[order] for k, v in cols.items()}
        side = {**parts[0].sidecar, "num_images": sum(p.num_images for p in parts), "shards_found": len(parts)}
        merged.append(SigmaResult(sigma=sigma, columns=cols, sidecar=side, path=parts[0].path))
    return merged


def _has_results_header(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline(4096).rstrip("\r\n").split("\t")
    except OSError:
        return False
    return "idx" in header and ("correct" in header or "predict" in header)


def _result_files(folder: Path, prefix: str) -> list[Path]:
    """``<prefix>*.tsv`` in ``folder``, plus other tools' result files named ``<prefix>*`` without that suffix
    (Cohen et al.'s ``certify.py`` writes ``noise_0.25/test/sigma_0.25``) whose first line is a results header."""
    found = set(folder.glob(f"{prefix}*.tsv"))
    for q in folder.glob(f"{prefix}*"):
        if q not in found and q.suffix.lower() not in (".json", ".md", ".png", ".lock", ".tmp") and q.is_file() \
                and _has_results_header(q):
            found.add(q)
    # sigma_<s>.merged.tsv (for Cohen's analyze.py) repeats the rows of the shards beside it
    return sorted(q for q in found if not (q.name.endswith(".merged.tsv") and
                                            any(folder.glob(q.name.removesuffix(".merged.tsv") + ".shard*of*.tsv"))))


def load_run(path: str | os.PathLike, name: str | None = None, prefix: str = "sigma_") -> Run:
    """Load ``DIR/<prefix><s>.tsv`` (+ ``.json`` sidecars) of a result directory, or a single TSV file.

    Raises:
        UserError: the path does not exist or holds no result TSVs.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"no results at {p}: no such file or directory")
    tsvs = [p] if p.is_file() else _result_files(p, prefix)
    if not tsvs:
        raise UserError(f"{p} holds no {prefix}*.tsv result files (run `smoothtransfer certify --out {p}` first)")
    results = []
    for tsv in tsvs:
        # "sigma_0.25" (Cohen's, no suffix) must not look for "sigma_0.json"
        side_path = tsv.with_suffix(".json") if tsv.suffix == ".tsv" else tsv.with_name(tsv.name + ".json")
        sidecar: dict[str, Any] = {}
        if side_path.exists():
            try:
                sidecar = json.loads(side_path.read_text())
            except (OSError, ValueError):
                raise UserError(f"{side_path} is not valid JSON") from None
        sigma = sidecar.get("sigma")
        if sigma is None:
            # Cohen's layout: .../noise_0.50/test/sigma_0.50 (no suffix): look at the name, then the folders
            sigma = next((s for s in map(_sigma_from_name, [tsv.name, *(q.name for q in tsv.parents)])
                          if s is not None), None)
        results.append(SigmaResult(sigma=sigma, columns=read_tsv(tsv), sidecar=sidecar, path=tsv))
    results = _merge_shards(results)
    results.sort(key=lambda r: (r.sigma is None, r.sigma or 0.0))
    default_name = p.name.removesuffix(".tsv") if p.is_file() else (p.resolve().name or str(p))
    return Run(name=name or default_name, path=p, results=results)


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
