"""Experiment results → paper-style markdown tables (report.md, RESULTS.md sections).

A table of an experiment YAML:

- ``rows``: ``{run, sigma}`` (one certified σ of a run); ``columns``: names from :data:`COLUMNS` (a
  registry: ``base``, ``base_noisy``, ``clean``, ``cert:R``, ``certacc:R``, ``acr``, ``abstain``, ``sa``,
  ``ra``, ``noise:S``, ``psnr`` — the row's denoiser's PSNR at its σ). Every accuracy is printed with its 95% Clopper-Pearson interval over the test
  images it counts.
- ``best_over_sigma: true``: rows are runs; each ``cert:R`` cell is the best of that run's certified σ
  curves at R, the view of Qiu et al. Tables 3-5 and FT-CADIS Table 1 (with :data:`BEST_NOTE`).
- ``paper: {source, rows: [{label, values: {column: number or "(a)b"}}]}``: the paper's numbers, as data,
  printed beside ours in the same columns; the experiment's ``paper_settings`` say what differs.
- ``claims: [{claim, a: {run, sigma}, b: {run, sigma}, metric, expect, margin?, paper?}]``: each paper
  comparison of two rows gets a paired interval on the same test images and a verdict computed from it
  (:mod:`smoothtransfer.reporting.compare`).

Why one file (~430 lines): the column registry, the cells, the best-over-σ view, the claims and the report
all read the same collected results; each is short and they are only used together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.denoiser_quality import PSNR_FILE
from smoothtransfer.experiments import store
from smoothtransfer.experiments.spec import EVAL_KINDS, Experiment
from smoothtransfer.reporting.compare import UNRESOLVED, clopper_pearson, paired_difference, verdict
from smoothtransfer.reporting.plots import plot_certified_accuracy
from smoothtransfer.reporting.tables import CAP_NOTE, cap_mark
from smoothtransfer.smoothing.results import load_run, read_summary, summary_entry, summary_sigmas
from smoothtransfer.utils import atomic_write_text, git_revision

BEST_NOTE = ("Best over σ (the paper's view): per radius, the highest of the model's certified σ curves; "
             "the σ it came from follows @. Each curve is a certificate at α on its own; choosing the best of "
             "k curves after seeing them is not one at α (α/k per σ would be), so the per-σ tables are the "
             "certificates and this view is for comparison with the paper.")
CI_NOTE = "Brackets: 95% Clopper-Pearson interval over the test images counted."


# ----------------------------------------------------------------------------------------------- reading


def collect(exp: Experiment) -> dict[str, Any]:
    """Per run: certify summary, noise profile, attack, training summary and run info — from its run directory
    when it holds results, else from the store. ``_dir`` records where they were read."""
    results: dict[str, Any] = {}
    for run in exp.runs.values():
        if run.train is None:
            continue
        d = store.source_dir(exp, run.id)
        r: dict[str, Any] = {"_dir": str(d)}
        for kind in EVAL_KINDS:
            f = d / kind / store.RESULT_FILE[kind]
            if f.is_file():
                r[kind] = read_summary(f) if kind == "certify" else json.loads(f.read_text())
        for key, f in (("train", d / "train" / "train_summary.json"), ("run_info", d / "train" / "run_info.json")):
            if f.is_file() and run.trains:
                r[key] = json.loads(f.read_text())
        dn = _denoiser_run(exp, run)
        psnr = store.source_dir(exp, dn) / "denoiser" / PSNR_FILE if dn else None
        if psnr is not None and psnr.is_file():
            r["psnr"] = json.loads(psnr.read_text())
        results[run.id] = r
    return results


def _denoiser_run(exp: Experiment, run) -> str | None:
    """The id of the grid's denoiser run that ``run`` is certified through, if any."""
    path = (run.evaluate.get("certify") or {}).get("denoiser")
    for other in exp.runs.values():
        if other.stage == "denoiser" and path and Path(path) == exp.out / other.id / "denoiser":
            return other.id
    return None


def _psnr(r: dict, sigma: float) -> str:
    for e in (r.get("psnr") or {}).get("psnr", []):
        if abs(float(e["sigma"]) - sigma) < 1e-9:
            return f"{e['denoised_db']:.1f} (input {e['noisy_db']:.1f})"
    return "–"


def _cert_at(s: dict, radius: float) -> float | None:
    for k, v in (s.get("certified_accuracy") or {}).items():
        if abs(float(k) - radius) < 1e-9:
            return float(v)
    return None


def _n(s: dict) -> int | None:
    n = s.get("num_done", s.get("num_images"))
    return int(n) if n else None


def _acc(frac: float | None, n: int | None) -> str:
    """``"71.4 [67.3, 75.2]"``; without ``n`` just the percentage."""
    if frac is None or (isinstance(frac, float) and math.isnan(frac)):
        return "–"
    if not n:
        return f"{100 * frac:.1f}"
    k = int(round(frac * n))
    lo, hi = clopper_pearson(k, n)
    return f"{100 * frac:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


# ------------------------------------------------------------------------------------------ the columns


def _noise_acc(r: dict, sigma: float) -> str:
    npf = r.get("noise_profile") or {}
    for k, v in (npf.get("accuracy") or {}).items():
        if abs(float(k) - sigma) < 1e-12:
            return _acc(v, npf.get("n"))
    return "–"


def _attack(r: dict, key: str) -> str:
    a = r.get("attack")
    if not a or a.get(key) is None:
        return "–"
    return _acc(a[key], a.get("n"))


def _cert_cell(r: dict, sigma: float, column: str) -> str:
    cert = r.get("certify")
    s = summary_entry(cert, sigma) if cert else None
    if s is None:
        return "–"
    n = _n(s)
    clean = _cert_at(s, 0.0)
    if column == "clean":
        return _acc(clean, n)
    if column == "acr":
        return f"{s.get('acr', float('nan')):.3f}"
    if column == "abstain":
        return _acc(s.get("abstain_rate"), n)
    kind, _, rad = column.partition(":")
    acc = _cert_at(s, float(rad))
    mark = cap_mark(float(rad), s.get("max_certifiable_radius"))  # as `report` marks them
    if acc is None and mark:
        acc = 0.0  # beyond what N samples can certify: 0 by construction (the summary's grid stops there)
    if acc is None:
        return "–"
    if kind == "cert" and clean is not None:
        return f"({100 * clean:.1f}){_acc(acc, n)}{mark}"
    return _acc(acc, n) + mark


#: column name (or prefix before ":") → (header, cell(results of the run, row σ, column) -> str)
COLUMNS: dict[str, tuple[Callable[[str], str], Callable[[dict, float, str], str]]] = {
    "base": (lambda c: "base clean acc.", lambda r, s, c: _noise_acc(r, 0.0)),
    "base_noisy": (lambda c: "base acc. under σ noise", lambda r, s, c: _noise_acc(r, s)),
    "noise": (lambda c: f"base acc. σ={c.split(':')[1]}", lambda r, s, c: _noise_acc(r, float(c.split(":")[1]))),
    "clean": (lambda c: "smoothed clean", _cert_cell),
    "cert": (lambda c: f"ε={c.split(':')[1]}", _cert_cell),
    "certacc": (lambda c: f"cert ε={c.split(':')[1]}", _cert_cell),
    "acr": (lambda c: "ACR", _cert_cell),
    "abstain": (lambda c: "abstain %", _cert_cell),
    "psnr": (lambda c: "denoiser PSNR dB", lambda r, s, c: _psnr(r, s)),
    "sa": (lambda c: "SA", lambda r, s, c: _attack(r, "standard_acc")),
    "ra": (lambda c: "RA", lambda r, s, c: _attack(r, "robust_acc")),
}


def _column(name: str):
    key = name.split(":", 1)[0]
    if key not in COLUMNS:
        raise UserError(f"unknown table column '{name}'; columns: {', '.join(COLUMNS)} (cert:R, noise:S take a value)")
    return COLUMNS[key]


def cell(results: dict, row: dict, column: str) -> str:
    """One table cell of ``row`` (``{run, sigma}``)."""
    return _column(column)[1](results.get(row["run"], {}), float(row.get("sigma", 0.25)), column)


def _header(column: str) -> str:
    return _column(column)[0](column)


def best_cell(results: dict, run: str, column: str) -> str:
    """``(clean)cert [lo, hi] @σ``: the best of ``run``'s certified σ curves at the column's radius."""
    cert = results.get(run, {}).get("certify")
    kind, _, rad = column.partition(":")
    if not cert or kind != "cert":
        return "–" if not cert else cell(results, {"run": run, "sigma": summary_sigmas(cert)[0]}, column)
    best = None
    for sigma in summary_sigmas(cert):
        s = summary_entry(cert, sigma)
        acc = _cert_at(s, float(rad))
        if acc is not None and (best is None or acc > best[0]):
            best = (acc, sigma, s)
    if best is None:
        return "–"
    acc, sigma, s = best
    mark = cap_mark(float(rad), s.get("max_certifiable_radius"))
    return f"({100 * _cert_at(s, 0.0):.1f}){_acc(acc, _n(s))}{mark} @{sigma:g}"


# ----------------------------------------------------------------------------------------- paired claims


def _indicators(results: dict, run: str, sigma: float, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(idx, indicator)`` of ``run`` at ``sigma``: correct and certified at the metric's radius, per image."""
    d = results.get(run, {}).get("_dir")
    if not d or not (Path(d) / "certify").is_dir():
        return None
    kind, _, rad = metric.partition(":")
    if kind not in ("cert", "certacc", "clean"):
        raise UserError(f"a claim's metric must be clean or cert:R (per-image certificates), got '{metric}'")
    radius = 0.0 if kind == "clean" else float(rad)
    res = load_run(Path(d) / "certify").at(sigma)
    if res is None:
        return None
    ok = (res.correct.astype(bool)) & (res.radii >= radius)
    return res.columns["idx"].astype(np.int64), ok


def claim_line(results: dict, claim: dict) -> str:
    """One verdict line: the paired difference of rows A and B on their common test images, and its verdict."""
    a, b, metric = claim["a"], claim["b"], claim.get("metric", "cert:0.25")
    ia = _indicators(results, a["run"], float(a.get("sigma", 0.25)), metric)
    ib = _indicators(results, b["run"], float(b.get("sigma", 0.25)), metric)
    paper = f"; paper: {claim['paper']}" if claim.get("paper") else ""
    if ia is None or ib is None:
        return f"- **not run yet at this scale** — {claim['claim']}{paper}"
    common, pa, pb = np.intersect1d(ia[0], ib[0], return_indices=True)
    d = paired_difference(ia[1][pa], ib[1][pb])
    margin = float(claim.get("margin", 0.0)) / 100
    v = verdict(d.lo, d.hi, claim.get("expect", ">"), margin)
    what = "smoothed clean accuracy" if metric == "clean" else f"certified accuracy at ε={metric.split(':')[1]}"
    return (f"- **{v}** — {claim['claim']}: {what} {100 * d.acc_a:.1f} vs {100 * d.acc_b:.1f}, difference "
            f"{100 * d.diff:+.1f} points [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] (paired 95% interval on the same "
            f"{d.n} images; {d.a_only} vs {d.b_only} discordant, McNemar p = {d.p_value:.2g}){paper}"
            + (f" (expected A ≈ B within ±{100 * margin:g})" if claim.get("expect") == "≈" else ""))


def verdicts(results: dict, table: dict) -> list[str]:
    return [claim_line(results, c) for c in table.get("claims", []) or []]


# ------------------------------------------------------------------------------------------- rendering


def _fmt_paper(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def render_table(exp: Experiment, results: dict, t: dict) -> list[str]:
    best = bool(t.get("best_over_sigma"))
    cols = t.get("columns", ["cert:0.25", "cert:0.5", "cert:0.75", "cert:1.0"])
    headers = t.get("headers") or [_header(c) for c in cols]
    lines = [f"### {t.get('title', t.get('id', 'table'))}", ""]
    if t.get("caption"):
        lines += [t["caption"], ""]
    lead = [t.get("row_header", "setting")] + ([] if best else ["σ"])
    lines.append("| " + " | ".join([*lead, *headers]) + " |")
    lines.append("|" + "---|" * (len(headers) + len(lead)))
    body: list[str] = []
    for row in t.get("rows", []):
        label = row.get("label") or exp.runs[row["run"]].label
        if best:
            cells = [best_cell(results, row["run"], c) if c.startswith("cert:") else cell(
                results, {"run": row["run"], "sigma": row.get("sigma", 0.25)}, c) for c in cols]
            body.append("| " + " | ".join([label, *cells]) + " |")
        else:
            cells = [cell(results, row, c) for c in cols]
            body.append("| " + " | ".join([label, str(row.get("sigma", "–")), *cells]) + " |")
    paper = t.get("paper") or {}
    for prow in paper.get("rows", []) or []:
        vals = prow.get("values") or {}
        cells = [_fmt_paper(vals.get(c)) for c in cols]
        sig = [] if best else [str(prow.get("sigma", "–"))]
        body.append("| " + " | ".join([f"_paper: {prow['label']}_", *sig, *cells]) + " |")
    lines += body + [""]
    notes = [CI_NOTE]
    if any("†" in b for b in body):
        notes.append(CAP_NOTE)
    if best:
        notes.append(BEST_NOTE)
    if paper.get("source"):
        notes.append(f"Paper rows: {paper['source']}, verbatim from `shared/papers/paper_tables.md` (their setting, "
                     "not ours; see the paper settings above).")
    lines += [" ".join(notes), ""]
    claims = verdicts(results, t)
    if claims:
        lines += ["Verdicts (computed from the paired intervals):", "", *claims, ""]
    disc = t.get("discussion")
    if isinstance(disc, dict):  # written after looking at a scale's measured table, so kept per scale
        disc = disc.get(exp.scale)
    if disc:
        lines += [f"_Discussion ({exp.scale})_: {str(disc).strip()}", ""]
    return lines


def render_tables(exp: Experiment, results: dict) -> str:
    lines: list[str] = []
    for t in exp.tables:
        lines += render_table(exp, results, t)
    return "\n".join(lines)


def verdict_summary(exp: Experiment, results: dict) -> dict[str, int]:
    """How many claims of the grid came out reproduced / contradicted / not resolved / not run."""
    counts: dict[str, int] = {}
    for t in exp.tables:
        for line in verdicts(results, t):
            key = line.split("**")[1]
            counts[key] = counts.get(key, 0) + 1
    return counts


def settings_line(exp: Experiment, results: dict | None = None) -> str:
    """Scale, the machines the runs were trained on (as recorded), wall time, N, α, images — with every table."""
    results = collect(exp) if results is None else results
    cpus, amps = set(), set()
    for r in results.values():
        info = r.get("run_info") or {}
        env = info.get("env") or {}
        if env:
            cpus.add(env.get("gpu") or f"{env.get('cpu', 'CPU')} ({env.get('cpu_count')} cores)")
        if isinstance(info.get("amp"), dict):
            amps.add(info["amp"].get("used"))
    timings = store.load_timings(exp)
    parts = [f"scale `{exp.scale}`", f"trained on: {'; '.join(sorted(cpus)) or 'not run yet'}"]
    if amps:
        parts.append(f"training precision: {', '.join(sorted(a for a in amps if a))}")
    # runs of one grid may run side by side (one process per core), so this is run time summed over runs
    parts.append(f"run time {sum(timings.values()) / 3600:.2f} h summed over runs")
    certs = [r.evaluate["certify"] for r in exp.runs.values() if "certify" in r.evaluate]
    if certs:
        c = certs[0]
        parts.append(f"N={c.get('n')}, n0={c.get('n0')}, α={c.get('alpha')}, "
                     f"{_n_images(results)} certified test images per σ")
    parts.append(f"git {git_revision()[:12]}")
    return "; ".join(parts)


def _n_images(results: dict) -> str:
    for r in results.values():
        cert = r.get("certify")
        for sigma in summary_sigmas(cert) if cert else []:
            n = _n(summary_entry(cert, sigma))
            if n:
                return str(n)
    return "?"


def _notes(exp: Experiment) -> list[str]:
    out = []
    scale_note = (exp.spec.get("scale_notes") or {}).get(exp.scale)
    if scale_note:
        out += [f"Scale `{exp.scale}`: {scale_note.strip()}", ""]
    if exp.spec.get("notes"):
        out += [str(exp.spec["notes"]).strip(), ""]
    if exp.spec.get("paper_settings"):
        out += [f"Paper settings that differ from ours: {str(exp.spec['paper_settings']).strip()}", ""]
    return out


def write_report(exp: Experiment, results: dict) -> Path:
    """``OUT/report.md`` (tables + settings) and ``OUT/certified_accuracy.png`` (curves of every certified run)."""
    body = [f"# {exp.spec.get('title', exp.name)}", "", f"_{settings_line(exp, results)}_", ""]
    if exp.spec.get("paper"):
        body += [f"Paper: {exp.spec['paper']}", ""]
    body += _notes(exp)
    body.append(render_tables(exp, results))
    png = exp.out / "certified_accuracy.png"
    try:
        runs = [load_run(Path(r["_dir"]) / "certify", name=rid) for rid, r in results.items() if r.get("certify")]
        if runs:
            exp.out.mkdir(parents=True, exist_ok=True)
            plot_certified_accuracy(runs, png)
            body += ["", f"![certified accuracy]({png.name})", ""]
    except (UserError, OSError, ValueError) as e:  # the tables are the result; a figure problem must not lose them
        body += ["", f"(plot not written: {e})", ""]
    exp.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp.out / "report.md", "\n".join(body))
    return exp.out / "report.md"


def update_results_md(path: Path, exp: Experiment, results: dict) -> None:
    """Replace (or add) this experiment+scale's section of RESULTS.md, generated from the results; unchanged
    text is not rewritten (a read-only checkout can regenerate and compare)."""
    begin, end = f"<!-- BEGIN {exp.name} {exp.scale} -->", f"<!-- END {exp.name} {exp.scale} -->"
    section = "\n".join([begin, f"## {exp.spec.get('title', exp.name)} — scale `{exp.scale}`", "",
                         f"_{settings_line(exp, results)}_", "", *_notes(exp), render_tables(exp, results), end])
    old = path.read_text() if path.exists() else None
    text = old or ("# Results\n\nGenerated by `smoothtransfer experiment NAME --scale S --results RESULTS.md` from "
                   "the committed result files under `results/`; never edited by hand.\n\n")
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    if text != old:
        atomic_write_text(path, text)


def check_tables(exp: Experiment) -> None:
    """Validate the table columns and claim expectations of a loaded grid (UserError naming the first)."""
    for t in exp.tables:
        for c in t.get("columns", []):
            _column(c)
        for c in t.get("claims", []) or []:
            if c.get("expect", ">") == "≈" and float(c.get("margin", 0)) <= 0:
                raise UserError(f"a '≈' claim of table '{t.get('id')}' needs margin > 0 (accuracy points)")
            verdict(0.0, 0.0, c.get("expect", ">"), 0.01)
            if c.get("metric", "cert:0.25").split(":")[0] not in ("cert", "certacc", "clean"):
                raise UserError(f"a claim of table '{t.get('id')}' has metric {c.get('metric')!r}; "
                                "claims compare clean or cert:R (per-image certificates)")


__all__ = ["BEST_NOTE", "COLUMNS", "UNRESOLVED", "cell", "check_tables", "collect", "render_tables",
           "settings_line", "update_results_md", "verdict_summary", "write_report"]
