"""The schema of a result directory: file names, TSV columns per mode, the format tag and its version.

Everything that names a result file or decides whether a file is ours to read lives here, so the writer
(:mod:`.write`), the summaries (:mod:`.summary`) and the reader (:mod:`.read`) agree by construction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smoothtransfer.errors import UserError

#: ``"format"`` of every sidecar and summary we write; JSON with another ``format`` is another tool's.
FORMAT = "smoothtransfer-results"
#: ``"version"`` of the sidecars and summaries written now. Files without one were written before versions were
#: recorded and read as version 1; a newer version is refused (a newer smoothtransfer wrote it).
FORMAT_VERSION = 1

MODES = ("certify", "predict")
CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "count", "n_used", "p_lower")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS}
COLUMNS_NOTE = {
    "certify": "time is seconds per image; count = votes for the selected class among the n_used estimation "
               "samples; p_lower = lower confidence bound on p_A behind the radius; abstain: predict=-1",
    "predict": "time is seconds per image; abstain: predict=-1",
}
PREFIX = {"certify": "sigma_", "predict": "predict_sigma_"}
SUMMARY_FILE = "summary.json"
PREDICT_SUMMARY_FILE = "predict_summary.json"
SUMMARY = {"certify": SUMMARY_FILE, "predict": PREDICT_SUMMARY_FILE}
#: the shard suffix of a result file's stem: ``sigma_0.25.shard1of4``
SHARD_RE = re.compile(r"\.shard(\d+)of(\d+)$")
MERGED_SUFFIX = ".merged.tsv"


def sigma_tag(sigma: float) -> str:
    """File-name tag of a noise level: two decimals when exact (``0.25``, ``0.50``, ``1.00``), else ``%g``."""
    return f"{sigma:.2f}" if round(sigma, 2) == sigma else f"{sigma:g}"


def result_stem(mode: str, sigma: float, shard: int = 0, num_shards: int = 1) -> str:
    """``sigma_0.25``, ``predict_sigma_0.25``, or with shards ``sigma_0.25.shard1of4`` (no suffix)."""
    return f"{PREFIX[mode]}{sigma_tag(sigma)}" + (f".shard{shard}of{num_shards}" if num_shards > 1 else "")


def num_shards_of(stem: str) -> int:
    """The ``K`` of a ``.shard<k>of<K>`` stem (1 for an unsharded file)."""
    m = SHARD_RE.search(stem)
    return int(m.group(2)) if m else 1


def sigma_sidecars(out: Path, mode: str, sigma: float) -> list[Path]:
    """Sidecars of one sigma: ``<prefix><tag>.json`` and its shards ``<prefix><tag>.shard<k>of<K>.json``."""
    stem = result_stem(mode, sigma)
    plain = out / f"{stem}.json"
    return ([plain] if plain.exists() else []) + sorted(out.glob(f"{stem}.shard*of*.json"))


def check_version(record: Any, path: str | Path) -> None:
    """Refuse (one-line UserError) a sidecar or summary written in a newer format version than this code reads.

    JSON of another tool (another ``format``) and files without a version (written before it was recorded,
    read as version 1) pass.
    """
    if not isinstance(record, Mapping) or record.get("format", FORMAT) != FORMAT:
        return
    version = record.get("version")
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{path} has results format version {version!r}, not a version number: the file is damaged")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} is in results format version {version}; this smoothtransfer reads versions up to "
                        f"{FORMAT_VERSION}: upgrade smoothtransfer to read it")


def certify_row(idx: int, label: int, predict: int, radius: float, correct: int, seconds: float, count: int,
                n_used: int, p_lower: float) -> str:
    """One CERTIFY TSV line (no newline), in :data:`CERTIFY_COLUMNS` order and the precision every file has."""
    return (f"{idx}\t{label}\t{predict}\t{radius:.6f}\t{correct}\t{seconds:.4f}\t{int(count)}\t{n_used}\t"
            f"{float(p_lower):.8g}")


def predict_row(idx: int, label: int, predict: int, correct: int, seconds: float) -> str:
    """One PREDICT TSV line (no newline), in :data:`PREDICT_COLUMNS` order."""
    return f"{idx}\t{label}\t{predict}\t{correct}\t{seconds:.4f}"


def as_stored(obj: Any) -> Any:
    """``obj`` as it reads back from a sidecar (tuples become lists, paths strings, ...), for comparisons."""
    return json.loads(json.dumps(obj, default=str))


def now() -> str:
    """UTC time stamp of sidecars and summaries, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
