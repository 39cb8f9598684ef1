"""Writing result files and deciding whether existing ones can be resumed.

A :class:`ResultFile` is one σ's TSV + sidecar (one shard's, when sharded). Before a run writes anything,
:func:`inspect_existing` reads what is on disk (sidecar settings must equal the run's; complete rows must be
the first of the selected images; a partial last line is dropped), :func:`check_siblings` compares the other
shards of the σ and :func:`check_other_sigmas` the other σ of the directory (one model per directory). Then
:func:`sidecar_record` is written atomically and :class:`RowWriter` appends the rows, each flushed and
fsync'ed before the next image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.results.schema import (
    COLUMNS,
    COLUMNS_NOTE,
    FORMAT,
    FORMAT_VERSION,
    PREFIX,
    as_stored,
    check_version,
    num_shards_of,
    result_stem,
    sigma_sidecars,
    sigma_tag,
)

#: What every sigma in one directory shares: summary.json and ``report`` show a directory as one model's run.
SAME_RUN_KEYS = ("checkpoint_sha256", "dataset", "split", "denoiser", "seed", "num_classes")


@dataclass
class ResultFile:
    """One sigma's result files (``tsv`` + ``sidecar``) and what resuming them requires."""

    mode: str
    sigma: float
    tsv: Path
    sidecar: Path
    done: list[list[str]] = field(default_factory=list)  # complete rows already on disk, as strings
    keep_bytes: int = 0  # truncate the TSV to this many bytes before appending (drops a partial line)
    old_sidecar: dict[str, Any] | None = None

    @classmethod
    def at(cls, out: Path, mode: str, sigma: float, shard: int = 0, num_shards: int = 1) -> ResultFile:
        stem = result_stem(mode, sigma, shard, num_shards)
        return cls(mode, sigma, out / f"{stem}.tsv", out / f"{stem}.json")

    @property
    def lock(self) -> Path:
        """``.<stem>.lock`` beside the TSV: held by the one process writing it."""
        return self.tsv.with_name(f".{self.tsv.stem}.lock")


def fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (after creating a file in ``path``)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mismatch(out_dir: Path, key: str, old: Any, new: Any) -> UserError:
    return UserError(
        f"{out_dir} holds results for other settings ({key}={old} there, {new} now); "
        "use another --out or --overwrite"
    )


def inspect_existing(job: ResultFile, settings: dict[str, Any], indices: list[int], out_dir: Path) -> None:
    """Fill ``job.done`` / ``job.keep_bytes`` / ``job.old_sidecar`` from the files on disk; raise UserError if
    they can't be resumed with ``settings`` for the images ``indices`` (in order)."""
    columns = COLUMNS[job.mode]
    if job.sidecar.exists():
        try:
            old = json.loads(job.sidecar.read_text())
            old_settings = old["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{job.sidecar} is not a readable results sidecar; use another --out or --overwrite") from None
        check_version(old, job.sidecar)
        settings = as_stored(settings)  # compare as stored (tuples -> lists, ...)
        for key in sorted(set(old_settings) | set(settings)):
            if old_settings.get(key) != settings.get(key):
                raise _mismatch(out_dir, key, old_settings.get(key), settings.get(key))
        job.old_sidecar = old
    elif job.tsv.exists():
        raise UserError(f"{job.tsv} exists without its sidecar {job.sidecar.name}; use another --out or --overwrite")
    if not job.tsv.exists():
        return
    data = job.tsv.read_bytes()
    header = ("\t".join(columns) + "\n").encode()
    if len(data) < len(header) and header.startswith(data):
        return  # killed while writing the header: start the file again
    if not data.startswith(header):
        raise UserError(f"{job.tsv} does not have the expected header; use another --out or --overwrite")
    end = data.rfind(b"\n") + 1  # everything after the last newline is a partial row
    rows = []
    for lineno, line in enumerate(data[len(header):end].decode().splitlines(), start=2):
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise UserError(f"{job.tsv} line {lineno} is corrupt; use another --out or --overwrite")
        rows.append(fields)
    done_idx = [int(r[0]) for r in rows]
    if done_idx != indices[: len(done_idx)]:
        raise UserError(
            f"{out_dir} holds results for other images ({len(done_idx)} rows that are not the first of the "
            f"{len(indices)} selected); use another --out or --overwrite"
        )
    job.done = rows
    job.keep_bytes = end


def selection_of(indices: Sequence[int]) -> dict[str, Any]:
    """The image selection of a run (before sharding): its size and a digest of the index list."""
    text = ",".join(str(int(i)) for i in indices)
    return {"num_images": len(indices), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_other_sigmas(out: Path, mode: str, jobs: Sequence[ResultFile], settings: dict[str, Any],
                       selection: dict[str, Any], full_idx: Sequence[int]) -> None:
    """A new sigma must come from the same checkpoint, seed and images as every sigma already in ``out``.

    The sigmas of this call are left to the resume / ``--overwrite`` checks (which compare all settings).
    Old sidecars without a ``selection`` are compared by count and first/last index when unsharded.
    """
    if not out.is_dir():
        return
    mine = {sigma_tag(job.sigma) for job in jobs}
    new = as_stored(settings)
    for side_path in sorted(out.glob(f"{PREFIX[mode]}*.json")):
        try:
            side = json.loads(side_path.read_text())
            sigma = float(side["sigma"])
            old = side["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        check_version(side, side_path)
        if not isinstance(old, dict) or side.get("kind") != mode or sigma_tag(sigma) in mine:
            continue
        for key in SAME_RUN_KEYS:
            there, now = old.get(key), new.get(key)
            if there != now:
                what = (f"another checkpoint (sha256 {str(there)[:12]}... there, {str(now)[:12]}... now)"
                        if key == "checkpoint_sha256" else f"other settings ({key}={there} there, {now} now)")
                raise UserError(f"{out} holds σ={sigma:g} results of {what}; one directory holds one model's "
                                "certification (summary.json and report show it as one run): use another --out")
        old_sel = side.get("selection")
        if old_sel is None and int(side.get("num_shards") or 1) == 1:  # written before selections were recorded
            legacy = (side.get("num_images"), side.get("first_idx"), side.get("last_idx"))
            differs = legacy != (len(full_idx), full_idx[0], full_idx[-1])
        else:
            differs = old_sel is not None and old_sel != selection
        if differs:
            count = (old_sel or {}).get("num_images", side.get("num_images"))
            raise UserError(f"{out} holds σ={sigma:g} results for other images ({count} selected there, "
                            f"{len(full_idx)} now{', not the same ones' if count == len(full_idx) else ''}); "
                            "certify the same images (--skip/--max) into it, or use another --out")


def check_siblings(job: ResultFile, settings: dict[str, Any], num_shards: int, out: Path, overwrite: bool) -> None:
    """Other shards of the same sigma must use the same number of shards and (unless overwritten) settings."""
    settings = as_stored(settings)
    for side in sigma_sidecars(out, job.mode, job.sigma):
        if side == job.sidecar:
            continue
        other = num_shards_of(side.stem)
        if other != num_shards:
            raise UserError(f"{out} holds results for sigma={job.sigma:g} split into {other} shard(s), not "
                            f"{num_shards}; use another --out")
        try:
            record = json.loads(side.read_text())
            old = record["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        check_version(record, side)
        diff = next((key for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)), None)
        if diff is not None and not overwrite:
            raise _mismatch(out, diff, old.get(diff), settings.get(diff))
        if diff is not None:
            raise UserError(f"{side.name} (another shard) has other settings ({diff}={old.get(diff)}); "
                            "--overwrite replaces only this shard, so use another --out")


def sidecar_record(job: ResultFile, settings: Mapping[str, Any], *, indices: Sequence[int], shard: int,
                   num_shards: int, selection: dict[str, Any], info: Mapping[str, Any] | None, git_rev: str | None,
                   environment: Mapping[str, Any], session: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of ``job`` for this session: format and version, the settings (at the top, for reading, and
    under ``settings``, compared on resume), the image selection, columns, ``info`` (paths, command line), and
    the sessions that wrote the TSV (the old sidecar's, then ``session``)."""
    old = job.old_sidecar or {}
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": job.mode,
        **settings,
        "num_images": len(indices), "first_idx": indices[0], "last_idx": indices[-1],
        "shard": shard, "num_shards": num_shards, "selection": selection,
        "columns": list(COLUMNS[job.mode]),
        "columns_note": COLUMNS_NOTE[job.mode],
        "settings": dict(settings),
        **dict(info or {}),
        "git_rev": git_rev,
        "environment": environment,
        "created": old.get("created", session["started"]),
        "sessions": [*old.get("sessions", []), dict(session)],
    }


class RowWriter:
    """Appends TSV rows durably: each row is written, flushed and fsync'ed before the next image.

    Opening truncates the TSV to ``job.keep_bytes`` (a partial last line goes) and writes the header into a
    new (or emptied) file."""

    def __init__(self, job: ResultFile) -> None:
        new = not job.tsv.exists()
        if job.tsv.exists():
            os.truncate(job.tsv, job.keep_bytes)
        self._f = open(job.tsv, "a", encoding="utf-8")
        if job.keep_bytes == 0:
            self.write("\t".join(COLUMNS[job.mode]))
        if new:
            fsync_dir(job.tsv.parent)

    def write(self, line: str) -> None:
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
