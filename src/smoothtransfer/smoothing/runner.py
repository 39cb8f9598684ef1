"""Certify (or PREDICT) every image of a dataset with a smoothed classifier, resumably.

Result files in ``out_dir`` (one set per noise level sigma, ``<s>`` = :func:`sigma_tag`, e.g. ``0.25``):

- ``sigma_<s>.tsv``: one row per image, columns ``idx label predict radius correct time count n_used
  p_lower``. The first six are Cohen et al.'s ``certify.py`` columns, so their ``analyze.py`` (which reads
  columns by name) works unchanged; ``time`` is in seconds (a float, not Cohen's ``h:mm:ss``). The three
  trailing columns are ours: ``count`` = votes ``n_A`` for the selected class among the ``n_used``
  estimation samples (``n_used = n`` for CERTIFY; fewer when sequential certification stops early),
  ``p_lower`` = the lower confidence bound on ``p_A`` behind the radius (one-sided Clopper-Pearson at level
  ``alpha``; at ``alpha / stages`` for sequential). Keeping ``count`` lets a report recompute bounds at
  another level (e.g. ``alpha / k`` for a best-over-k-sigmas certificate, DESIGN rule 5).
  Abstentions have ``predict = -1``, ``radius = 0``, ``correct = 0``.
- ``sigma_<s>.json``: sidecar with the settings (sigma, n0, n, alpha, seed, checkpoint, dataset, split,
  ...), git revision, environment and the history of sessions that wrote the TSV.
- ``summary.json``: per sigma, certified accuracy at radii ``0, 0.25, ...`` (``{"0": .., "0.25": ..}``) up
  to one step past the largest radius ``n`` samples can certify, ACR, abstain rate, smoothed clean accuracy,
  images/s and samples/s; rebuilt from all sidecars + TSVs in ``out_dir`` after each sigma.
- Sharded runs (``shard=(k, K)``, one process per GPU into the same directory) write
  ``sigma_<s>.shard<k>of<K>.tsv/.json``; ``summary.json`` and :func:`smoothtransfer.reporting.load_run`
  merge the shards of each sigma. The per-image seeds make the merged rows equal to an unsharded run's.
- PREDICT: ``predict_sigma_<s>.tsv`` (``idx label predict correct time``), ``predict_sigma_<s>.json``,
  ``predict_summary.json``.

Reproducibility and resumption: the noise for image ``idx`` at noise level ``sigma`` comes from its own
generator seeded by :func:`image_seed` ``(seed, sigma, idx)``, so each certificate depends only on the
settings and the image, not on the order or on restarts. Rows are appended, flushed and fsync'ed one at a
time; a restarted run checks the sidecar against the current settings, drops a trailing partial line (a
kill during a write) and continues after the last complete row, so no row is lost or duplicated and the
certificates equal those of an uninterrupted run (on the same device type: CPU and CUDA generators draw
different noise).

One writer, one model: a process holds an exclusive ``flock`` on ``.<result file stem>.lock`` while it
writes that result file (the OS releases it if the process dies), so a second run on the same files is
refused with one line instead of interleaving rows. A directory holds one model's certification: a new
sigma must have the checkpoint digest, dataset, split, denoiser, seed and image selection of the sigmas
already there. Forked CPU workers die with the parent (``PR_SET_PDEATHSIG``), SIGTERM stops a run like
Ctrl-C, a worker killed by the OOM killer and a read-only or full disk are reported in one line, and a
finished run rewrites nothing (``summary.json`` only when more than its time stamp changed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.metrics import abstain_rate, accuracy, radius_grid, summarize_certificates
from smoothtransfer.smoothing.smooth import ABSTAIN, Smooth, sigma_too_small
from smoothtransfer.smoothing.stats import max_certifiable_radius
from smoothtransfer.utils import (
    WRITE_ERRNOS,
    atomic_write_json,
    environment_info,
    git_revision,
    resolve_device,
    sigterm_as_interrupt,
    write_error,
    write_if_changed,
)

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "count", "n_used", "p_lower")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
SUMMARY_FILE = "summary.json"
PREDICT_SUMMARY_FILE = "predict_summary.json"
FORMAT = "smoothtransfer-results"
FORMAT_VERSION = 1
SEED_SCHEME = "sha256(mode:seed:repr(sigma):idx)[:8]"

BaseClassifier = nn.Module | Callable[[float], nn.Module]
CertifyFn = Callable[[Any, torch.Tensor, torch.Generator], Any]


def sigma_tag(sigma: float) -> str:
    """File-name tag of a noise level: two decimals when exact (``0.25``, ``0.50``, ``1.00``), else ``%g``."""
    return f"{sigma:.2f}" if round(sigma, 2) == sigma else f"{sigma:g}"


def image_seed(seed: int, sigma: float, idx: int, mode: str = "certify") -> int:
    """The 63-bit seed of the noise generator for one image (stable across processes and restarts)."""
    digest = hashlib.sha256(f"{mode}:{int(seed)}:{float(sigma)!r}:{int(idx)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- file handling


@dataclass
class _Job:
    """One sigma's result file and what resuming it requires."""

    sigma: float
    tsv: Path
    sidecar: Path
    done: list[list[str]] = field(default_factory=list)  # complete rows already on disk, as strings
    keep_bytes: int = 0  # truncate the TSV to this many bytes before appending (drops a partial line)
    old_sidecar: dict[str, Any] | None = None


def _fsync_dir(path: Path) -> None:
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


def _inspect_existing(job: _Job, columns: Sequence[str], settings: dict[str, Any], indices: list[int],
                      out_dir: Path) -> None:
    """Fill ``job.done`` / ``job.keep_bytes`` from files on disk; raise UserError if they can't be resumed."""
    if job.sidecar.exists():
        try:
            old = json.loads(job.sidecar.read_text())
            old_settings = old["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(
                f"{job.sidecar} is not a readable results sidecar; use another --out or --overwrite") from None
        settings = json.loads(json.dumps(settings, default=str))  # compare as stored (tuples -> lists, ...)
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


class _RowWriter:
    """Appends TSV rows durably: each row is written, flushed and fsync'ed before the next image."""

    def __init__(self, job: _Job, columns: Sequence[str]) -> None:
        new = not job.tsv.exists()
        if job.tsv.exists():
            os.truncate(job.tsv, job.keep_bytes)
        self._f = open(job.tsv, "a", encoding="utf-8")
        if job.keep_bytes == 0:
            self.write("\t".join(columns))
        if new:
            _fsync_dir(job.tsv.parent)

    def write(self, line: str) -> None:
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class _Locks:
    """Exclusive locks on ``.<result stem>.lock`` files, one per result file this process writes.

    ``fcntl.flock`` locks belong to the open file, so the OS releases them when the process dies, even by
    ``kill -9``: a stale lock cannot block a resume. A second writer (another terminal, a retried job) is
    refused instead of interleaving rows into the same TSV. The lock file holds the owner's pid (for the
    message) and is removed on release; where ``fcntl`` is missing (not POSIX) nothing is locked.
    """

    def __init__(self) -> None:
        self.held: list[tuple[Path, int]] = []

    def acquire(self, lock: Path, what: Path) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                who = f"another process (pid {owner})" if owner.isdigit() else "another process"
                raise UserError(f"{who} is writing {what}; wait for it to finish (then rerun to resume), or use "
                                "another --out") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous owner removes the file on release; if it did so after we opened it, ours is stale.
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.held.append((lock, fd))

    def fds(self) -> list[int]:
        return [fd for _, fd in self.held]

    def release(self) -> None:
        while self.held:
            lock, fd = self.held.pop()
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still locked: a waiting process sees the inode change and retries
            os.close(fd)


def _lock_path(job: _Job) -> Path:
    return job.tsv.with_name(f".{job.tsv.stem}.lock")


#: What every sigma in one directory shares: summary.json and ``report`` show a directory as one model's run.
_SAME_RUN_KEYS = ("checkpoint_sha256", "dataset", "split", "denoiser", "seed", "num_classes")


def _selection_of(indices: Sequence[int]) -> dict[str, Any]:
    """The image selection of a run (before sharding): its size and a digest of the index list."""
    text = ",".join(str(int(i)) for i in indices)
    return {"num_images": len(indices), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _check_other_sigmas(out: Path, prefix: str, mode: str, jobs: Sequence[_Job], settings: dict[str, Any],
                        selection: dict[str, Any], full_idx: Sequence[int]) -> None:
    """A new sigma must come from the same checkpoint, seed and images as every sigma already in ``out``.

    The sigmas of this call are left to the resume / ``--overwrite`` checks (which compare all settings).
    Old sidecars without a ``selection`` are compared by count and first/last index when unsharded.
    """
    if not out.is_dir():
        return
    mine = {sigma_tag(job.sigma) for job in jobs}
    new = json.loads(json.dumps(settings, default=str))
    for side_path in sorted(out.glob(f"{prefix}*.json")):
        try:
            side = json.loads(side_path.read_text())
            sigma = float(side["sigma"])
            old = side["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(old, dict) or side.get("kind") != mode or sigma_tag(sigma) in mine:
            continue
        for key in _SAME_RUN_KEYS:
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


# ------------------------------------------------------------------------------------------- the runner


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _base_for_sigma(model: BaseClassifier, sigma: float, device: torch.device) -> nn.Module:
    base = model if isinstance(model, nn.Module) else model(sigma)
    return base.to(device).eval()


def _validate(sigmas: Sequence[float], n0: int | None, n: int, alpha: float, batch_size: int,
              indices: list[int], dataset_len: int) -> None:
    if not sigmas:
        raise UserError("give at least one noise level --sigma")
    for s in sigmas:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise UserError(f"--sigma must be > 0, got {s}")
        if sigma_too_small(float(s)):
            raise UserError(sigma_too_small(float(s)))
    if len(set(map(float, sigmas))) != len(sigmas):
        raise UserError(f"--sigma lists a noise level twice: {list(sigmas)}")
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if n0 is not None:
        if n0 < 1:
            raise UserError(f"--n0 must be >= 1, got {n0}")
        if n0 > n:
            raise UserError(f"--n0 ({n0}) must not exceed --n ({n})")
    if not (0.0 < alpha < 1.0):
        raise UserError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if not indices:
        raise UserError("no images selected (check --skip/--max against the dataset size)")
    bad = [i for i in indices if not 0 <= i < dataset_len]
    if bad:
        raise UserError(f"image index {bad[0]} is out of range for a dataset of {dataset_len} images")
    if len(set(indices)) != len(indices):
        raise UserError("the selected image indices contain duplicates")


_SHARD_RE = re.compile(r"\.shard(\d+)of(\d+)$")


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    k, num = (int(v) for v in shard)
    if num < 1 or not 0 <= k < num:
        raise UserError(f"--shard must be K/NUM with 0 <= K < NUM, got {k}/{num}")
    return k, num


def _sigma_files(out: Path, prefix: str, tag: str) -> list[Path]:
    """Sidecars of one sigma: ``<prefix><tag>.json`` and its shards ``<prefix><tag>.shard<k>of<K>.json``."""
    plain = out / f"{prefix}{tag}.json"
    return ([plain] if plain.exists() else []) + sorted(out.glob(f"{prefix}{tag}.shard*of*.json"))


def _check_siblings(job: _Job, settings: dict[str, Any], num_shards: int, out: Path, overwrite: bool) -> None:
    """Other shards of the same sigma must use the same number of shards and (unless overwritten) settings."""
    prefix = job.sidecar.name.split(sigma_tag(job.sigma))[0]
    settings = json.loads(json.dumps(settings, default=str))
    for side in _sigma_files(out, prefix, sigma_tag(job.sigma)):
        if side == job.sidecar:
            continue
        m = _SHARD_RE.search(side.stem)
        other = int(m.group(2)) if m else 1
        if other != num_shards:
            raise UserError(f"{out} holds results for sigma={job.sigma:g} split into {other} shard(s), not "
                            f"{num_shards}; use another --out")
        try:
            old = json.loads(side.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        diff = next((key for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)), None)
        if diff is not None and not overwrite:
            raise _mismatch(out, diff, old.get(diff), settings.get(diff))
        if diff is not None:
            raise UserError(f"{side.name} (another shard) has other settings ({diff}={old.get(diff)}); "
                            "--overwrite replaces only this shard, so use another --out")


def auto_pack(mode: str, n0: int | None, n: int, batch_size: int, per_image: bool) -> int:
    """Images per :meth:`Smooth.certify_batch` call: enough to fill one forward batch with the smallest draw.

    ``batch_size // n0`` for CERTIFY (the ``n0`` selection draws are the small ones), ``batch_size // n`` for
    PREDICT, at least 1 and at most 64 (rows are written once per group). 1 for a custom ``certify_fn``
    (sequential certification decides per image how many samples to draw).
    """
    if per_image:
        return 1
    smallest = min(n0, n) if (mode == "certify" and n0) else n
    return max(1, min(64, batch_size // max(1, smallest)))


class _Engine:
    """Computes the TSV rows of a group of images at one sigma (in this process or in a worker)."""

    def __init__(self, mode: str, smooth: Smooth, dataset: Any, device: torch.device, seed: int, n0: int | None,
                 n: int, alpha: float, batch_size: int, certify_fn: CertifyFn | None) -> None:
        self.mode, self.smooth, self.dataset, self.device = mode, smooth, dataset, device
        self.seed, self.n0, self.n, self.alpha, self.batch_size = seed, n0, n, alpha, batch_size
        self.certify_fn = certify_fn

    def rows(self, idxs: Sequence[int]) -> list[tuple[str, int]]:
        """``[(tsv line, correct), ...]`` for ``idxs`` in order; ``time`` is the group's time / its size."""
        sigma, device = self.smooth.sigma, self.device
        items = [self.dataset[i] for i in idxs]
        xs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items]).to(device)
        labels = [int(y) for _, y in items]
        gens = [torch.Generator(device=device).manual_seed(image_seed(self.seed, sigma, i, self.mode)) for i in idxs]
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.mode == "predict":
                if len(idxs) == 1:
                    preds = [int(self.smooth.predict(xs[0], self.n, self.alpha, self.batch_size, generator=gens[0]))]
                else:
                    preds = self.smooth.predict_batch(xs, self.n, self.alpha, self.batch_size, generators=gens)
                certs = [None] * len(idxs)
            elif self.certify_fn is not None:
                certs = [self.certify_fn(self.smooth, x, g) for x, g in zip(xs, gens)]
            elif len(idxs) == 1:
                certs = [self.smooth.certify_full(xs[0], self.n0, self.n, self.alpha, self.batch_size,
                                                  generator=gens[0])]
            else:
                certs = self.smooth.certify_batch(xs, self.n0, self.n, self.alpha, self.batch_size,
                                                  generators=gens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - t0) / len(idxs)
        out = []
        for k, (idx, label) in enumerate(zip(idxs, labels)):
            if self.mode == "certify":
                cert = certs[k]
                pred = int(cert.prediction)
                radius = float(cert.radius) if pred != ABSTAIN else 0.0
                n_used = int(getattr(cert, "n_used", self.n))
                correct = int(pred == label)
                line = (f"{idx}\t{label}\t{pred}\t{radius:.6f}\t{correct}\t{elapsed:.4f}\t{int(cert.count)}\t"
                        f"{n_used}\t{float(cert.p_lower):.8g}")
            else:
                pred = preds[k]
                correct = int(pred == label)
                line = f"{idx}\t{label}\t{pred}\t{correct}\t{elapsed:.4f}"
            out.append((line, correct))
        return out


# A forked worker finds the engine here (set by the parent just before it forks the pool).
_FORK_ENGINE: _Engine | None = None


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when the parent does, even by ``kill -9``: orphaned workers would otherwise wait
    on their task pipe forever (the forked children hold its write end too, so they never see EOF).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set up by the kernel; elsewhere a thread that watches the
    parent pid. Workers write no file (the parent writes every row), so SIGKILL loses nothing.
    """
    import signal
    import threading

    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            armed = ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_init(threads: int, parent: int, close_fds: Sequence[int] = ()) -> None:
    import signal

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent may turn SIGTERM into KeyboardInterrupt: not here
    for fd in close_fds:  # the parent's result-file locks: they must end with the parent, not with a worker
        with contextlib.suppress(OSError):
            os.close(fd)
    torch.set_num_threads(threads)


def _worker_rows(idxs: list[int]) -> list[tuple[str, int]]:
    assert _FORK_ENGINE is not None
    return _FORK_ENGINE.rows(idxs)


def cpu_workers_available() -> bool:
    """Worker processes need ``fork`` (Linux): they inherit the loaded model instead of pickling it."""
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _worker_death(procs: Mapping[int, Any]) -> UserError:
    """One line naming the worker that died (e.g. killed by the out-of-memory killer) and how to go on."""
    import signal

    codes = {pid: p.exitcode for pid, p in procs.items()}
    # The pool terminates (SIGTERM) the other workers once one has died: name the first one.
    dead = [pid for pid, c in codes.items() if c not in (None, 0, -signal.SIGTERM)] or \
        [pid for pid, c in codes.items() if c not in (None, 0)]
    parts = []
    for pid in dead:
        code = codes[pid]
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            why = f"was killed by {name}" + (" (the out-of-memory killer does that)" if code == -signal.SIGKILL else "")
        else:
            why = f"exited with status {code}"
        parts.append(f"worker process {pid} {why}")
    what = "; ".join(parts) or "a worker process died"
    return UserError(f"{what}; the rows written so far are kept: rerun the same command to resume (with fewer "
                     "--workers, or --workers 1, if memory is short)")


def _map_groups(engine: _Engine, groups: list[list[int]], workers: int, close_fds: Sequence[int] = ()):
    """Yield ``engine.rows(g)`` for each group in order; with ``workers > 1``, computed by forked processes.

    Why processes and not threads: on CPU, one single-threaded process per core certifying its own images
    scales almost linearly, while intra-op threads split each small convolution and scaled 1.36x from one
    to two cores on the development box (``benchmarks/certify_throughput.py --workers``). Results are the
    same either way: every image has its own seeded generator.
    """
    global _FORK_ENGINE
    if workers <= 1 or len(groups) <= 1:
        for g in groups:
            yield engine.rows(g)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, torch.get_num_threads() // workers)
    _FORK_ENGINE = engine
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(threads, os.getpid(), tuple(close_fds)))
    pending: deque = deque()
    procs: dict[int, Any] = {}
    it = iter(groups)
    try:
        for g in it:  # keep every worker busy with two groups in flight, results taken in order
            pending.append(pool.submit(_worker_rows, g))
            procs.update(getattr(pool, "_processes", None) or {})
            if len(pending) >= 2 * workers:
                break
        while pending:
            fut = pending.popleft()
            while not wait([fut], timeout=0.5).done:
                pass  # wake up twice a second: a signal that reached another thread (kill's SIGTERM) runs now
            rows = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_worker_rows, nxt))
            yield rows
    except BrokenProcessPool:
        procs.update(getattr(pool, "_processes", None) or {})
        pool.shutdown(wait=True, cancel_futures=True)  # the pool stops the other workers; then read exit codes
        raise _worker_death(procs) from None
    except BaseException:
        # Interrupted (Ctrl-C, an error, or the consumer stopped): stop the workers now rather than let them
        # finish images whose rows would not be written; the next run resumes after the last written row.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        raise
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        _FORK_ENGINE = None


def _run(mode: str, model: BaseClassifier, dataset: Any, **kw: Any) -> dict[str, Any]:
    """:func:`_run_locked` holding this call's result-file locks (released at the end, or by the OS if the
    process dies), with SIGTERM handled like Ctrl-C and a failed write (read-only or full disk) reported as
    one line; rows already written stay, and rerunning the same command resumes after them."""
    locks = _Locks()
    try:
        with sigterm_as_interrupt():
            return _run_locked(mode, model, dataset, locks=locks, **kw)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, kw.get("out_dir"), kept="results written so far are kept: rerun the same command "
                          "to resume once it can write") from None
    finally:
        locks.release()


def _write_summary(out: Path, mode: str) -> dict[str, Any]:
    """Rebuild ``summary.json`` (``predict_summary.json``) from the files; write it only if more than its
    ``updated`` time changed, so rerunning a finished run writes nothing (and works in a read-only folder)."""
    summary = summarize_dir(out, mode=mode)
    path = out / (SUMMARY_FILE if mode == "certify" else PREDICT_SUMMARY_FILE)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and "updated" in old:
        def same(d: dict[str, Any]) -> str:
            return json.dumps({**d, "updated": None}, default=str)

        if same(old) == same(json.loads(json.dumps(summary, default=str))):
            return summary
    atomic_write_json(path, summary)
    return summary


def _run_locked(
    mode: str,
    model: BaseClassifier,
    dataset: Any,
    *,
    locks: _Locks,
    sigmas: Sequence[float],
    n0: int | None,
    n: int,
    alpha: float,
    batch_size: int,
    out_dir: str | os.PathLike,
    indices: Sequence[int] | None,
    seed: int,
    device: str | torch.device,
    num_classes: int | None,
    progress: bool,
    amp_dtype: torch.dtype | None,
    certify_fn: CertifyFn | None,
    certifier: str,
    identity: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
    overwrite: bool,
    shard: tuple[int, int] | None,
    workers: int = 1,
    pack: int | None = None,
) -> dict[str, Any]:
    out = Path(out_dir)
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    sigmas = [float(s) for s in sigmas]
    idx_list = [int(i) for i in (range(len(dataset)) if indices is None else indices)]
    k, num_shards = _check_shard(shard)
    _validate(sigmas, n0, n, alpha, batch_size, idx_list, len(dataset))
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be an integer >= 1, got {workers}")
    if pack is not None and (not isinstance(pack, int) or pack < 1):
        raise UserError(f"--pack must be an integer >= 1, got {pack}")
    if workers > 1 and device.type != "cpu":
        raise UserError(f"--workers applies to CPU certification; on {device.type} run one process per GPU with "
                        "torchrun (or --shard K/NUM)")
    if workers > 1 and not cpu_workers_available():
        raise UserError("--workers needs the 'fork' start method (Linux); use --workers 1 here")
    if len(idx_list) <= k:
        raise UserError(f"shard {k}/{num_shards} of {len(idx_list)} images is empty; use fewer shards")
    full_idx = idx_list
    idx_list = idx_list[k::num_shards]
    if num_classes is None:
        num_classes = len(dataset.classes)
    columns = CERTIFY_COLUMNS if mode == "certify" else PREDICT_COLUMNS
    prefix = "sigma_" if mode == "certify" else "predict_sigma_"
    amp_name = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))

    jobs: list[_Job] = []
    for sigma in sigmas:
        tag = sigma_tag(sigma)
        stem = f"{prefix}{tag}" + (f".shard{k}of{num_shards}" if num_shards > 1 else "")
        jobs.append(_Job(sigma, out / f"{stem}.tsv", out / f"{stem}.json"))
    settings_of = {
        job.sigma: {
            "mode": mode, "sigma": job.sigma, "n0": n0, "n": n, "alpha": alpha, "seed": int(seed),
            "seed_scheme": SEED_SCHEME, "num_classes": int(num_classes), "amp": amp_name, "certifier": certifier,
            **dict(identity or {}),
        }
        for job in jobs
    }
    # Check every sigma's existing files before any work or writing, and again once this process holds the
    # result files' locks (another process may have written in between).
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    selection = _selection_of(full_idx)

    def check() -> None:
        for job in jobs:
            job.done, job.keep_bytes, job.old_sidecar = [], 0, None
        _check_other_sigmas(out, prefix, mode, jobs, settings_of[jobs[0].sigma], selection, full_idx)
        for job in jobs:
            _check_siblings(job, settings_of[job.sigma], num_shards, out, overwrite)
        if not overwrite:
            for job in jobs:
                _inspect_existing(job, columns, settings_of[job.sigma], idx_list, out)

    check()
    if not overwrite and all(job.old_sidecar is not None and len(job.done) == len(idx_list) for job in jobs):
        return _write_summary(out, mode)  # finished: nothing to certify or lock, and no file rewritten

    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        locks.acquire(_lock_path(job), job.tsv)
    check()
    if overwrite:
        for job in jobs:
            job.tsv.unlink(missing_ok=True)
            job.sidecar.unlink(missing_ok=True)

    git_rev = git_revision()
    env = environment_info()
    for job in jobs:
        sigma = job.sigma
        todo = idx_list[len(job.done):]
        if not todo and job.old_sidecar is not None:
            continue  # already complete: nothing to write
        session = {"started": _now(), "git_rev": git_rev, "device": str(device), "batch_size": batch_size,
                   "workers": workers, "threads_per_worker": max(1, torch.get_num_threads() // workers),
                   "resumed_after_rows": len(job.done)}
        old = job.old_sidecar or {}
        sidecar = {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": mode,
            **settings_of[sigma],
            "num_images": len(idx_list), "first_idx": idx_list[0], "last_idx": idx_list[-1],
            "shard": k, "num_shards": num_shards, "selection": selection,
            "columns": list(columns),
            "columns_note": (
                "time is seconds per image; count = votes for the selected class among the n_used estimation "
                "samples; p_lower = lower confidence bound on p_A behind the radius; abstain: predict=-1"
                if mode == "certify" else "time is seconds per image; abstain: predict=-1"
            ),
            "settings": settings_of[sigma],
            **dict(info or {}),
            "git_rev": git_rev,
            "environment": env,
            "created": old.get("created", session["started"]),
            "sessions": [*old.get("sessions", []), session],
        }
        atomic_write_json(job.sidecar, sidecar)

        # fast=False: the command already prepared the classifier (layout, batch size, compile) and --amp is
        # explicit; a denoiser inside the base classifier keeps its own layout.
        smooth = Smooth(_base_for_sigma(model, sigma, device), num_classes, sigma, amp_dtype=amp_dtype, fast=False)
        engine = _Engine(mode, smooth, dataset, device, seed, n0, n, alpha, batch_size, certify_fn)
        n_correct = sum(int(r[columns.index("correct")]) for r in job.done)
        n_rows = len(job.done)
        group = pack if pack is not None else auto_pack(mode, n0, n, batch_size, certify_fn is not None)
        groups = [todo[i:i + group] for i in range(0, len(todo), group)]
        writer = _RowWriter(job, columns)
        bar = _progress(len(idx_list), n_rows, f"{mode} sigma={sigma:g}", progress)
        try:
            for rows in _map_groups(engine, groups, workers, locks.fds()):
                for line, correct in rows:
                    writer.write(line)
                    n_rows += 1
                    n_correct += correct
                bar.set_postfix(acc=f"{n_correct / n_rows:.3f}", refresh=False)
                bar.update(len(rows))
        finally:
            bar.close()
            writer.close()
        _write_summary(out, mode)
    return _write_summary(out, mode)


def certify_dataset(
    model: BaseClassifier,
    dataset: Any,
    *,
    sigmas: Sequence[float],
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    out_dir: str | os.PathLike,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    certify_fn: CertifyFn | None = None,
    certifier: str = "cohen",
    identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    workers: int = 1,
    pack: int | None = None,
) -> dict[str, Any]:
    """Certify ``dataset[i]`` for ``i in indices`` at each noise level; write results to ``out_dir``.

    Args:
        model: the base classifier ``f: (B,C,H,W) in [0,1] (+noise) -> logits (B,K)``, or a callable
            ``sigma -> nn.Module`` building one per noise level (e.g. a denoiser trained for that sigma in
            front of the classifier). Put in eval mode and moved to ``device``.
        dataset: ``len(dataset)``, ``dataset[i] -> (image float (C,H,W) in [0,1], label int)``, and
            ``.classes`` when ``num_classes`` is not given.
        sigmas: noise levels sigma (in [0,1] pixel units), each certified separately (own files, own alpha).
        n0, n, alpha: CERTIFY's selection samples, estimation samples and failure probability.
        batch_size: noisy samples per forward pass.
        out_dir: result directory (see the module docstring); resumed when it already holds a partial run.
        indices: image indices to certify, in order (default: all).
        seed: base seed; image ``idx`` uses ``torch.Generator().manual_seed(image_seed(seed, sigma, idx))``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch.device; noise generators live there too.
        num_classes: K (default ``len(dataset.classes)``).
        progress: show a tqdm bar (images, running certified accuracy at r=0).
        amp_dtype: ``torch.bfloat16``/``torch.float16`` to run the base classifier under autocast (noise is
            still drawn and added in float32 by ``Smooth``), or None.
        certify_fn: replaces ``Smooth.certify_full``: ``certify_fn(smooth, x (C,H,W), generator) ->`` an object
            with ``prediction, radius, count, p_lower`` and optionally ``n_used`` (default ``n``), e.g. a
            :class:`~smoothtransfer.smoothing.sequential.SequentialCertificate`.
        certifier: name of the certification procedure, recorded and checked on resume.
        identity: extra json-able facts that must match on resume (checkpoint hash, dataset, split, ...).
        info: extra json-able facts recorded in the sidecars only (paths, command line).
        overwrite: delete this run's existing files for these sigmas instead of resuming.
        shard: ``(k, K)`` to certify only ``indices[k::K]`` (one process per GPU, same ``out_dir``); files
            get a ``.shard<k>of<K>`` suffix and ``summary.json`` / reports merge the shards of each sigma.
        workers: CPU only: certify with this many forked worker processes (Linux), each with
            ``torch.get_num_threads() // workers`` threads, rows still written in order by this process.
            Changes no result (per-image seeds); the TSV does not depend on it, so a run may resume with
            another number of workers.
        pack: images per :meth:`Smooth.certify_batch` call (noisy copies of several images share forward
            batches); default :func:`auto_pack`. Changes no result.

    Returns:
        The ``summary.json`` contents (also written to ``out_dir``).

    Raises:
        UserError: bad settings, or ``out_dir`` holds results for other settings/images (nothing written).
    """
    return _run("certify", model, dataset, sigmas=sigmas, n0=n0, n=n, alpha=alpha, batch_size=batch_size,
                out_dir=out_dir, indices=indices, seed=seed, device=device, num_classes=num_classes,
                progress=progress, amp_dtype=amp_dtype, certify_fn=certify_fn, certifier=certifier,
                identity=identity, info=info, overwrite=overwrite, shard=shard, workers=workers, pack=pack)


def predict_dataset(
    model: BaseClassifier,
    dataset: Any,
    *,
    sigmas: Sequence[float],
    n: int,
    alpha: float,
    batch_size: int,
    out_dir: str | os.PathLike,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    workers: int = 1,
    pack: int | None = None,
) -> dict[str, Any]:
    """Cohen's PREDICT over a dataset: ``predict_sigma_<s>.tsv`` rows ``idx label predict correct time``.

    Same arguments, files and resumption as :func:`certify_dataset` (without ``n0``). PREDICT returns the
    top class of ``n`` noisy samples unless a two-sided binomial test at level ``alpha`` cannot separate it
    from the runner-up (then it abstains). Returns the ``predict_summary.json`` contents (accuracy and abstain
    rate per sigma).
    """
    return _run("predict", model, dataset, sigmas=sigmas, n0=None, n=n, alpha=alpha, batch_size=batch_size,
                out_dir=out_dir, indices=indices, seed=seed, device=device, num_classes=num_classes,
                progress=progress, amp_dtype=amp_dtype, certify_fn=None, certifier="predict",
                identity=identity, info=info, overwrite=overwrite, shard=shard, workers=workers, pack=pack)


# ------------------------------------------------------------------------------------------ shards


def merge_shards(out_dir: str | os.PathLike, mode: str = "certify") -> dict[str, Any]:
    """Merge complete sharded results: ``sigma_<s>.merged.tsv`` holds every shard's rows sorted by ``idx``
    (one file for Cohen's ``analyze.py``), and ``summary.json`` is rewritten. A sigma whose shards are not
    all complete yet is left alone (the last shard to finish merges). Returns the summary."""
    out = Path(out_dir)
    prefix = "sigma_" if mode == "certify" else "predict_sigma_"
    columns = CERTIFY_COLUMNS if mode == "certify" else PREDICT_COLUMNS
    by_sigma: dict[str, list[Path]] = {}
    for side in sorted(out.glob(f"{prefix}*.shard*of*.json")):
        m = _SHARD_RE.search(side.stem)
        if m:
            by_sigma.setdefault(side.stem[: m.start()], []).append(side)
    for stem, sides in by_sigma.items():
        try:
            metas = [json.loads(p.read_text()) for p in sides]
        except (OSError, ValueError):
            continue
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
        write_if_changed(out / f"{stem}.merged.tsv", text)
    return _write_summary(out, mode)


# ------------------------------------------------------------------------------------------ summaries


def read_rows(tsv: str | os.PathLike) -> dict[str, list[str]]:
    """Columns of a results TSV as lists of strings (complete lines only; a partial last line is ignored)."""
    text = Path(tsv).read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is partial (or empty)
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


def summarize_dir(out_dir: str | os.PathLike, mode: str = "certify", radius_step: float = 0.25) -> dict[str, Any]:
    """Summary of every ``(predict_)sigma_*.json`` + TSV in ``out_dir`` (what ``summary.json`` holds).

    ``{"format", "version", "kind", "updated", "note", "num_images", "sigmas": [per-sigma dicts]}``. Per
    sigma (the shards of a sigma merged): settings, ``num_images`` (selected) and ``num_done`` (rows on disk), ``complete``, and
    :func:`~smoothtransfer.evaluation.metrics.summarize_certificates` at radii ``0, 0.25, ...`` up to one
    step past ``max_certifiable_radius(sigma, n, alpha)`` and at least to 1 (certify), or accuracy and abstain
    rate (predict).
    """
    out = Path(out_dir)
    prefix = "sigma_" if mode == "certify" else "predict_sigma_"
    groups: dict[float, list[tuple[dict[str, Any], Path, dict[str, list[str]]]]] = {}
    for side_path in sorted(out.glob(f"{prefix}*.json")):
        try:
            side = json.loads(side_path.read_text())
        except (OSError, ValueError):
            continue
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
    note = (
        "clean_accuracy is the certified accuracy at radius 0 from CERTIFY: the accuracy of the smoothed "
        "classifier, abstentions counted wrong. Each sigma is certified and reported separately at level alpha "
        "(no best-over-sigma selection). images_per_s and samples_per_s use the per-image times in the TSV "
        "(seconds of one process), times the number of CPU worker processes of the latest session."
        if mode == "certify" else
        "accuracy of Cohen's PREDICT at level alpha, abstentions counted wrong."
    )
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": f"{mode}-summary", "updated": _now(),
            "note": note, "num_images": max((e["num_images"] for e in results), default=0), "sigmas": results}
