"""Certify (or PREDICT) every image of a dataset with a smoothed classifier, resumably: the running.

Why ~520 lines: one procedure (validation, locks, row engine, per-σ loop) and its two documented entry points.

This module computes the rows; :mod:`smoothtransfer.smoothing.results` owns the files they go into (names,
columns, sidecars, ``summary.json``, shards, resume inspection, the reader) and documents them. Forked CPU
workers live in :mod:`smoothtransfer.smoothing.workers`.

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
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.results import (
    CERTIFY_COLUMNS,
    COLUMNS,
    FORMAT,
    FORMAT_VERSION,
    PREDICT_COLUMNS,
    PREDICT_SUMMARY_FILE,
    SUMMARY_FILE,
    merge_shards,
    read_rows,
    sigma_tag,
    summarize_dir,
    write_summary,
)
from smoothtransfer.smoothing.results.schema import certify_row, now, predict_row
from smoothtransfer.smoothing.results.write import (
    ResultFile,
    RowWriter,
    check_other_sigmas,
    check_siblings,
    inspect_existing,
    selection_of,
    sidecar_record,
)
from smoothtransfer.smoothing.smooth import ABSTAIN, Smooth, sigma_too_small
from smoothtransfer.smoothing.workers import cpu_workers_available, map_groups
from smoothtransfer.utils import (
    WRITE_ERRNOS,
    amp_name,
    atomic_write_json,
    environment_info,
    git_revision,
    resolve_device,
    sigterm_as_interrupt,
    write_error,
)

#: names of the results format, importable from here as before (:mod:`smoothtransfer.smoothing.results`)
__all__ = ["CERTIFY_COLUMNS", "FORMAT", "FORMAT_VERSION", "PREDICT_COLUMNS", "PREDICT_SUMMARY_FILE", "SEED_SCHEME",
           "SUMMARY_FILE", "auto_pack", "certify_dataset", "cpu_workers_available", "image_seed", "merge_shards",
           "predict_dataset", "read_rows", "sigma_tag", "summarize_dir"]

SEED_SCHEME = "sha256(mode:seed:repr(sigma):idx)[:8]"


BaseClassifier = nn.Module | Callable[[float], nn.Module]
CertifyFn = Callable[[Any, torch.Tensor, torch.Generator], Any]


def image_seed(seed: int, sigma: float, idx: int, mode: str = "certify") -> int:
    """The 63-bit seed of the noise generator for one image (stable across processes and restarts)."""
    digest = hashlib.sha256(f"{mode}:{int(seed)}:{float(sigma)!r}:{int(idx)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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



def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    k, num = (int(v) for v in shard)
    if num < 1 or not 0 <= k < num:
        raise UserError(f"--shard must be K/NUM with 0 <= K < NUM, got {k}/{num}")
    return k, num



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
                line = certify_row(idx, label, pred, radius, correct, elapsed, cert.count, n_used, cert.p_lower)
            else:
                pred = preds[k]
                correct = int(pred == label)
                line = predict_row(idx, label, pred, correct, elapsed)
            out.append((line, correct))
        return out




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
    amp = amp_name(amp_dtype)

    jobs = [ResultFile.at(out, mode, sigma, k, num_shards) for sigma in sigmas]
    settings_of = {
        job.sigma: {
            "mode": mode, "sigma": job.sigma, "n0": n0, "n": n, "alpha": alpha, "seed": int(seed),
            "seed_scheme": SEED_SCHEME, "num_classes": int(num_classes), "amp": amp, "certifier": certifier,
            **dict(identity or {}),
        }
        for job in jobs
    }
    # Check every sigma's existing files before any work or writing, and again once this process holds the
    # result files' locks (another process may have written in between).
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    selection = selection_of(full_idx)

    def check() -> None:
        for job in jobs:
            job.done, job.keep_bytes, job.old_sidecar = [], 0, None
        check_other_sigmas(out, mode, jobs, settings_of[jobs[0].sigma], selection, full_idx)
        for job in jobs:
            check_siblings(job, settings_of[job.sigma], num_shards, out, overwrite)
        if not overwrite:
            for job in jobs:
                inspect_existing(job, settings_of[job.sigma], idx_list, out)

    check()
    if not overwrite and all(job.old_sidecar is not None and len(job.done) == len(idx_list) for job in jobs):
        return write_summary(out, mode)  # finished: nothing to certify or lock, and no file rewritten

    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        locks.acquire(job.lock, job.tsv)
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
        session = {"started": now(), "git_rev": git_rev, "device": str(device), "batch_size": batch_size,
                   "workers": workers, "threads_per_worker": max(1, torch.get_num_threads() // workers),
                   "resumed_after_rows": len(job.done)}
        atomic_write_json(job.sidecar, sidecar_record(
            job, settings_of[sigma], indices=idx_list, shard=k, num_shards=num_shards, selection=selection,
            info=info, git_rev=git_rev, environment=env, session=session))

        # fast=False: the command already prepared the classifier (layout, batch size, compile) and --amp is
        # explicit; a denoiser inside the base classifier keeps its own layout.
        smooth = Smooth(_base_for_sigma(model, sigma, device), num_classes, sigma, amp_dtype=amp_dtype, fast=False)
        engine = _Engine(mode, smooth, dataset, device, seed, n0, n, alpha, batch_size, certify_fn)
        n_correct = sum(int(r[COLUMNS[mode].index("correct")]) for r in job.done)
        n_rows = len(job.done)
        group = pack if pack is not None else auto_pack(mode, n0, n, batch_size, certify_fn is not None)
        groups = [todo[i:i + group] for i in range(0, len(todo), group)]
        writer = RowWriter(job)
        bar = _progress(len(idx_list), n_rows, f"{mode} sigma={sigma:g}", progress)
        try:
            for rows in map_groups(engine.rows, groups, workers, locks.fds()):
                for line, correct in rows:
                    writer.write(line)
                    n_rows += 1
                    n_correct += correct
                bar.set_postfix(acc=f"{n_correct / n_rows:.3f}", refresh=False)
                bar.update(len(rows))
        finally:
            bar.close()
            writer.close()
        write_summary(out, mode)
    return write_summary(out, mode)


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
