"""``summary.json`` (``predict_summary.json``) and shard merges: built from the sidecars + TSVs of a directory.

:func:`summarize_dir` computes the summary, :func:`write_summary` writes it only when more than its time stamp
changed, :func:`merge_shards` writes ``sigma_<σ>.merged.tsv`` once every shard of a σ is complete, and
:func:`read_summary` / :func:`summary_entry` / :func:`complete_sigmas` read a summary back.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.metrics import abstain_rate, accuracy, radius_grid, summarize_certificates
from smoothtransfer.smoothing.results.read import read_rows
from smoothtransfer.smoothing.results.schema import (
    COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    MERGED_SUFFIX,
    PREFIX,
    SHARD_RE,
    SUMMARY,
    SUMMARY_FILE,
    as_stored,
    check_version,
    now,
)
from smoothtransfer.smoothing.stats import max_certifiable_radius
from smoothtransfer.utils import atomic_write_json, write_if_changed

_NOTE = {
    "certify": "clean_accuracy is the certified accuracy at radius 0 from CERTIFY: the accuracy of the smoothed "
               "classifier, abstentions counted wrong. Each sigma is certified and reported separately at level "
               "alpha (no best-over-sigma selection). images_per_s and samples_per_s use the per-image times in the "
               "TSV (seconds of one process), times the number of CPU worker processes of the latest session.",
    "predict": "accuracy of Cohen's PREDICT at level alpha, abstentions counted wrong.",
}


def summarize_dir(out_dir: str | os.PathLike, mode: str = "certify", radius_step: float = 0.25) -> dict[str, Any]:
    """Summary of every ``(predict_)sigma_*.json`` + TSV in ``out_dir`` (what ``summary.json`` holds).

    ``{"format", "version", "kind", "updated", "note", "num_images", "sigmas": [per-sigma dicts]}``. Per
    sigma (the shards of a sigma merged): settings, ``num_images`` (selected) and ``num_done`` (rows on disk),
    ``complete``, and :func:`~smoothtransfer.evaluation.metrics.summarize_certificates` at radii
    ``0, 0.25, ...`` up to one step past ``max_certifiable_radius(sigma, n, alpha)`` and at least to 1
    (certify), or accuracy and abstain rate (predict). A sidecar in a newer format version: UserError.
    """
    out = Path(out_dir)
    groups: dict[float, list[tuple[dict[str, Any], Path, dict[str, list[str]]]]] = {}
    for side_path in sorted(out.glob(f"{PREFIX[mode]}*.json")):
        try:
            side = json.loads(side_path.read_text())
        except (OSError, ValueError):
            continue
        check_version(side, side_path)
        if not isinstance(side, dict) or side.get("kind") != mode:
            continue
        tsv = side_path.with_suffix(".tsv")
        groups.setdefault(float(side["sigma"]), []).append((side, tsv, read_rows(tsv) if tsv.exists() else {}))
    results = []
    for sigma, parts in groups.items():
        side = parts[0][0]
        cols: dict[str, list[str]] = {}
        for _, _, part in parts:  # shards of one sigma: merge their rows
            for key, vals in part.items():
                cols.setdefault(key, []).extend(vals)
        entry: dict[str, Any] = {
            "sigma": sigma, "n0": side.get("n0"), "n": side["n"], "alpha": side["alpha"],
            "seed": side.get("seed"), "tsv": [tsv.name for _, tsv, _ in parts] if len(parts) > 1 else parts[0][1].name,
            "num_images": sum(int(p[0].get("num_images") or 0) for p in parts),
            "num_done": len(cols.get("idx", [])),
        }
        entry["complete"] = entry["num_done"] == entry["num_images"]
        preds = [int(v) for v in cols.get("predict", [])]
        correct = [int(v) for v in cols.get("correct", [])]
        times = [float(v) for v in cols.get("time", [])]
        if mode == "certify":
            max_r = float(max_certifiable_radius(sigma, side["n"], side["alpha"]))
            entry["max_certifiable_radius"] = max_r
            num_images = entry["num_images"]
            entry.update(summarize_certificates(
                [float(v) for v in cols.get("radius", [])], correct, preds,
                # one grid point past the cap (accuracy 0 there by construction) and at least up to r = 1
                thresholds=radius_grid(max(max_r + radius_step, 1.0), radius_step), times=times,
                samples_per_image=[side["n0"] + int(v) for v in cols["n_used"]] if "n_used" in cols
                else side["n0"] + side["n"],
            ))
            entry["num_images"] = num_images  # selected; "num_done" counts the rows
            # The TSV times are per process; W forked CPU workers certify W images at a time.
            workers = int((side.get("sessions") or [{}])[-1].get("workers") or 1)
            entry["workers"] = workers
            for key in ("images_per_s", "samples_per_s"):
                if key in entry:
                    entry[key] *= workers
        else:
            total = sum(times)
            entry.update({
                "accuracy": accuracy(correct), "abstain_rate": abstain_rate(preds), "seconds": total,
                "images_per_s": len(times) / total if total > 0 else math.nan,
                "samples_per_s": len(times) * side["n"] / total if total > 0 else math.nan,
            })
        for key in ("checkpoint", "dataset", "split", "denoiser", "certifier", "amp"):
            if key in side:
                entry[key] = side[key]
        results.append(entry)
    results.sort(key=lambda e: e["sigma"])
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": f"{mode}-summary", "updated": now(),
            "note": _NOTE[mode], "num_images": max((e["num_images"] for e in results), default=0), "sigmas": results}


def write_summary(out: Path, mode: str = "certify") -> dict[str, Any]:
    """Rebuild ``summary.json`` (``predict_summary.json``) from the files; write it only if more than its
    ``updated`` time changed, so rerunning a finished run writes nothing (and works in a read-only folder)."""
    summary = summarize_dir(out, mode=mode)
    path = out / SUMMARY[mode]
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and "updated" in old:
        def same(d: dict[str, Any]) -> str:
            return json.dumps({**d, "updated": None}, default=str)

        if same(old) == same(as_stored(summary)):
            return summary
    atomic_write_json(path, summary)
    return summary


def merge_shards(out_dir: str | os.PathLike, mode: str = "certify") -> dict[str, Any]:
    """Merge complete sharded results: ``sigma_<s>.merged.tsv`` holds every shard's rows sorted by ``idx``
    (one file for Cohen's ``analyze.py``), and ``summary.json`` is rewritten. A sigma whose shards are not
    all complete yet is left alone (the last shard to finish merges). Returns the summary."""
    out = Path(out_dir)
    columns = COLUMNS[mode]
    by_sigma: dict[str, list[Path]] = {}
    for side in sorted(out.glob(f"{PREFIX[mode]}*.shard*of*.json")):
        m = SHARD_RE.search(side.stem)
        if m:
            by_sigma.setdefault(side.stem[: m.start()], []).append(side)
    for stem, sides in by_sigma.items():
        try:
            metas = [json.loads(p.read_text()) for p in sides]
        except (OSError, ValueError):
            continue
        for side, meta in zip(sides, metas):
            check_version(meta, side)
        num_shards = int(metas[0].get("num_shards") or 0)
        rows: list[list[str]] = []
        complete = len(sides) == num_shards
        for side, meta in zip(sides, metas):
            tsv = side.with_suffix(".tsv")
            cols = read_rows(tsv) if tsv.exists() else {}
            n_rows = len(cols.get("idx", []))
            complete = complete and n_rows == int(meta.get("num_images") or -1)
            rows += [list(r) for r in zip(*(cols.get(c, []) for c in columns))]
        if not complete:
            continue
        rows.sort(key=lambda r: int(r[0]))
        text = "\t".join(columns) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
        write_if_changed(out / f"{stem}{MERGED_SUFFIX}", text)
    return write_summary(out, mode)


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A ``summary.json`` (or a directory's): UserError when unreadable, not JSON or in a newer format version."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None
    check_version(summary, path)
    return summary


def _entries(summary: dict[str, Any]) -> list[dict[str, Any]]:
    # "sigmas": a list (written now); "per_sigma": a dict by σ (early summaries)
    per = summary.get("per_sigma") or summary.get("sigmas") or {}
    return list(per.values() if isinstance(per, dict) else per)


def summary_entry(summary: dict[str, Any], sigma: float) -> dict[str, Any] | None:
    """The per-σ entry of a summary (None when σ is not in it)."""
    for v in _entries(summary):
        if abs(float(v.get("sigma", -1)) - float(sigma)) < 1e-9:
            return v
    return None


def summary_sigmas(summary: dict[str, Any]) -> list[float]:
    """The σ of a summary, ascending."""
    return sorted(float(v["sigma"]) for v in _entries(summary) if "sigma" in v)


def complete_sigmas(out_dir: str | os.PathLike, mode: str = "certify") -> set[float]:
    """σ (rounded to 9 decimals) with every selected image done, per ``out_dir``'s summary (a summary is written
    after each σ, so its mere existence does not mean a run finished). Empty without a readable summary;
    UserError for a newer format version."""
    path = Path(out_dir) / SUMMARY[mode]
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    check_version(summary, path)
    per = summary.get("sigmas") or []
    return {round(float(e["sigma"]), 9) for e in per if e.get("complete", e.get("num_done") == e.get("num_images"))}
