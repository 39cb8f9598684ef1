"""Reading result files: the one reader behind ``report``, the experiment tables and users' scripts.

:func:`load_run` turns a result directory (or one TSV) into a :class:`Run` of typed per-σ
:class:`SigmaResult` s: the TSV columns as arrays ``(N,)`` plus the sidecar, the shards of a σ merged. It also
reads Cohen et al.'s raw ``certify.py`` output (``time`` as ``h:mm:ss.ffffff``, no sidecar, no ``.tsv`` suffix
as in ``noise_0.25/test/sigma_0.25``; σ is then parsed from the names). :func:`read_rows` is the raw layer
under it and under the summaries: the columns as the exact strings on disk.

Both readers take only newline-terminated lines: a run killed mid-write leaves a partial last line.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.metrics import abstain_rate, acr, certified_accuracy
from smoothtransfer.smoothing.results.schema import MERGED_SUFFIX, PREFIX, check_version
from smoothtransfer.smoothing.stats import max_certifiable_radius

_INT_COLUMNS = ("idx", "label", "predict", "correct", "count")
_NUMERIC_COLUMNS = (*_INT_COLUMNS, "time", "radius", "n_used", "p_lower")
_SIGMA_IN_NAME = re.compile(r"(?:sigma|noise)[_=-]?(\d+(?:\.\d+)?)")


def complete_lines(text: str) -> list[str]:
    """The newline-terminated lines of ``text``: the piece after the last newline is partial (or empty)."""
    return text.split("\n")[:-1]


def read_rows(tsv: str | os.PathLike) -> dict[str, list[str]]:
    """Columns of a results TSV as lists of the strings on disk (complete lines only; a line with the wrong
    number of fields is skipped). Lossless, for summaries and shard merges of files that may still grow."""
    lines = complete_lines(Path(tsv).read_text())
    if not lines:
        return {}
    header = lines[0].split("\t")
    cols: dict[str, list[str]] = {h: [] for h in header}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(header):
            continue
        for h, v in zip(header, fields):
            cols[h].append(v)
    return cols


def seconds(value: str) -> float:
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
    # Any complete row that does not parse is refused with its line number (as certify refuses to resume
    # such a file): skipping it would silently change every number of the table.
    lines = [(no, ln.rstrip("\r")) for no, ln in enumerate(complete_lines(text), start=1) if ln.strip()]
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
        convert, dtype = {"time": (seconds, np.float64)}.get(
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


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """A sidecar's contents; UserError when it is not JSON or is in a newer format version."""
    path = Path(path)
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is not valid JSON") from None
    check_version(sidecar, path)
    return sidecar


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

    def at(self, sigma: float) -> SigmaResult | None:
        """The result at noise level ``sigma`` (None when the run has none)."""
        return next((r for r in self.results if r.sigma is not None and abs(r.sigma - float(sigma)) < 1e-9), None)


def _sigma_from_name(name: str) -> float | None:
    m = _SIGMA_IN_NAME.search(name)
    return float(m.group(1)) if m else None


def merge_shard_results(results: list[SigmaResult]) -> list[SigmaResult]:
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


def result_files(folder: Path, prefix: str = PREFIX["certify"]) -> list[Path]:
    """``<prefix>*.tsv`` in ``folder``, plus other tools' result files named ``<prefix>*`` without that suffix
    (Cohen et al.'s ``certify.py`` writes ``noise_0.25/test/sigma_0.25``) whose first line is a results header."""
    found = set(folder.glob(f"{prefix}*.tsv"))
    for q in folder.glob(f"{prefix}*"):
        if q not in found and q.suffix.lower() not in (".json", ".md", ".png", ".lock", ".tmp") and q.is_file() \
                and _has_results_header(q):
            found.add(q)
    # sigma_<s>.merged.tsv (for Cohen's analyze.py) repeats the rows of the shards beside it
    return sorted(q for q in found if not (q.name.endswith(MERGED_SUFFIX) and
                                            any(folder.glob(q.name.removesuffix(MERGED_SUFFIX) + ".shard*of*.tsv"))))


def load_run(path: str | os.PathLike, name: str | None = None, prefix: str = PREFIX["certify"]) -> Run:
    """Load ``DIR/<prefix><s>.tsv`` (+ ``.json`` sidecars) of a result directory, or a single TSV file.

    Raises:
        UserError: the path does not exist or holds no result TSVs; a sidecar is not JSON or is in a newer
            results format version.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"no results at {p}: no such file or directory")
    tsvs = [p] if p.is_file() else result_files(p, prefix)
    if not tsvs:
        raise UserError(f"{p} holds no {prefix}*.tsv result files (run `smoothtransfer certify --out {p}` first)")
    results = []
    for tsv in tsvs:
        # "sigma_0.25" (Cohen's, no suffix) must not look for "sigma_0.json"
        side_path = tsv.with_suffix(".json") if tsv.suffix == ".tsv" else tsv.with_name(tsv.name + ".json")
        sidecar = read_sidecar(side_path) if side_path.exists() else {}
        sigma = sidecar.get("sigma")
        if sigma is None:
            # Cohen's layout: .../noise_0.50/test/sigma_0.50 (no suffix): look at the name, then the folders
            sigma = next((s for s in map(_sigma_from_name, [tsv.name, *(q.name for q in tsv.parents)])
                          if s is not None), None)
        results.append(SigmaResult(sigma=sigma, columns=read_tsv(tsv), sidecar=sidecar, path=tsv))
    results = merge_shard_results(results)
    results.sort(key=lambda r: (r.sigma is None, r.sigma or 0.0))
    default_name = p.name.removesuffix(".tsv") if p.is_file() else (p.resolve().name or str(p))
    return Run(name=name or default_name, path=p, results=results)
