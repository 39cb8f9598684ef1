"""The results store: the small result files of every run of a grid, kept apart from its run directories.

Run directories hold checkpoints (large, never committed) and live wherever ``--out`` /
``$SMOOTHTRANSFER_RUNS`` puts them. The store (``results/NAME/SCALE/<run id>/...`` in the repository) holds
what tables are made of — certify TSVs and sidecars, ``summary.json`` (their format and reader:
:mod:`smoothtransfer.smoothing.results`), noise-profile and attack JSON, the training summary, run info and
config — plus ``settings.json``, the run's settings without machine paths.
A run whose stored settings equal the grid's and whose evaluations are all stored is *complete*: the engine
reuses it instead of training again, so a fresh clone regenerates RESULTS.md without re-running anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
from pathlib import Path
from typing import Any

from smoothtransfer.config import TrainConfig, to_dict
from smoothtransfer.evaluation.denoiser_quality import PSNR_FILE
from smoothtransfer.experiments.spec import Experiment, Run
from smoothtransfer.smoothing.results import SUMMARY_FILE, complete_sigmas
from smoothtransfer.utils import atomic_write_bytes, atomic_write_json

#: per sub-directory of a run directory: the file patterns the store keeps
KEEP = {
    "train": ("train_summary.json", "run_info.json", "config.yaml"),
    "certify": ("*.tsv", "*.json"),
    "noise_profile": ("*.json",),
    "attack": ("*.json",),
    "denoiser": ("*.json",),
}
#: a result file larger than this is not "small": refuse to copy it into a repository
MAX_FILE_BYTES = 8 * 2**20
#: the file that marks an evaluation finished
RESULT_FILE = {"certify": SUMMARY_FILE, "noise_profile": "noise_profile.json", "attack": "attack.json"}
# settings that name places on one machine, not what was computed
_PATH_KEYS = {"out", "init", "data_root", "denoiser", "device", "progress", "tensorboard", "threads",
              "checkpoint_every"}


def _strip_paths(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_paths(v) for k, v in d.items() if k not in _PATH_KEYS}
    if isinstance(d, (list, tuple)):
        return [_strip_paths(v) for v in d]
    return d


def run_settings(exp: Experiment, run: Run) -> dict:
    """What a run computes (training config, denoiser arguments, evaluations), without machine paths, and the
    settings of every run it starts from: a fine-tune of a changed upstream run is not the same run."""
    return json.loads(json.dumps({
        "stage": run.stage, "init_run": run.init,
        "train": _strip_paths(to_dict(run.train)) if run.train is not None else None,
        "denoiser_args": _strip_paths(run.denoiser_args), "evaluate": _strip_paths(run.evaluate),
        "needs": {dep: _model_settings(run_settings(exp, exp.runs[dep])) if dep == run.init and not run.trains
                  else run_settings(exp, exp.runs[dep]) for dep in run.needs if dep in exp.runs},
    }))


def _fill_defaults(d: dict, defaults: dict) -> dict:
    out = dict(d)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _fill_defaults(out[k], v)
    return out


def _with_train_defaults(settings: Any, defaults: dict | None = None) -> Any:
    """Stored ``settings`` with every training-config key added to :class:`TrainConfig` since they were stored
    filled in at its default, in the run's own ``train`` block and in those of the runs it starts from.

    Why: a config key is added with the old behaviour as its default (``compile: false`` came after the
    mixed-noise grid was stored), so a run stored before the key existed computed what the key's default
    computes; without this, every new key would make every stored grid stale and re-run it from scratch.
    A stored key that is no longer a config key, or a stored value other than the new default, still counts
    as a change."""
    if not isinstance(settings, dict):
        return settings
    if defaults is None:  # once per stored file, shared by the runs it starts from
        defaults = json.loads(json.dumps(_strip_paths(to_dict(TrainConfig()))))
    out = dict(settings)
    if isinstance(out.get("train"), dict):
        out["train"] = _fill_defaults(out["train"], defaults)
    if isinstance(out.get("needs"), dict):
        out["needs"] = {k: _with_train_defaults(v, defaults) for k, v in out["needs"].items()}
    return out


def _model_settings(settings: dict) -> dict:
    """What defines a run's model, without its evaluations: an evaluate run of it depends on that alone."""
    return {k: v for k, v in settings.items() if k != "evaluate"}


def stored_dir(exp: Experiment, run_id: str) -> Path | None:
    return exp.results_dir / run_id if exp.results_dir else None


def is_complete(exp: Experiment, run: Run) -> bool:
    """The store holds every result of ``run`` for the grid's current settings."""
    d = stored_dir(exp, run.id)
    if d is None or not (d / "settings.json").is_file():
        return False
    try:
        if _with_train_defaults(json.loads((d / "settings.json").read_text())) != run_settings(exp, run):
            return False
    except ValueError:
        return False
    if run.stage == "denoiser":
        psnr_wanted = (run.denoiser_args or {}).get("psnr_images", 1) != 0
        return any((d / "denoiser").glob("*.json")) and (not psnr_wanted or (d / "denoiser" / PSNR_FILE).is_file())
    if run.trains and not (d / "train" / "train_summary.json").is_file():
        return False
    if not all((d / kind / RESULT_FILE[kind]).is_file() for kind in run.evaluate):
        return False
    if "certify" not in run.evaluate:
        return True
    done = complete_sigmas(d / "certify")  # every σ the grid certifies, with all its images
    return all(round(float(s), 9) in done for s in run.evaluate["certify"].get("sigmas", []))


def export_run(exp: Experiment, run: Run) -> None:
    """Copy the small result files of a finished run from its run directory into the store."""
    dest = stored_dir(exp, run.id)
    if dest is None:
        return
    src = exp.out / run.id
    for sub, patterns in KEEP.items():
        if sub == "train" and not run.trains:  # trains nothing (a leftover train/ is not its own)
            continue
        for pattern in patterns:
            for f in sorted((src / sub).glob(pattern)):
                if not f.is_file() or f.stat().st_size > MAX_FILE_BYTES:
                    continue
                atomic_write_bytes(dest / sub / f.name, f.read_bytes())  # a reader never sees half a file
    atomic_write_json(dest / "settings.json", run_settings(exp, run))


def source_dir(exp: Experiment, run_id: str) -> Path:
    """Where the results of ``run_id`` are read from: its run directory when it holds any, else the store."""
    live = exp.out / run_id
    trains = run_id not in exp.runs or exp.runs[run_id].trains
    if any((live / kind / f).is_file() for kind, f in RESULT_FILE.items()) or \
            (trains and (live / "train" / "train_summary.json").is_file()):
        return live
    stored = stored_dir(exp, run_id)
    return stored if stored is not None and stored.is_dir() else live


def load_timings(exp: Experiment) -> dict[str, float]:
    """Wall seconds per run id: the run directory's timings, completed by the store's."""
    out: dict[str, float] = {}
    for d in (exp.results_dir, exp.out):
        p = d / "timings.json" if d else None
        if p is not None and p.is_file():
            out.update(json.loads(p.read_text()))
    return out


def add_timing(exp: Experiment, run_id: str, seconds: float) -> None:
    """Add ``seconds`` of wall time to ``run_id`` in the run directory's and the store's ``timings.json``.

    Read-modify-write under an exclusive lock, so two processes working on different runs of one grid (one
    per core) keep each other's entries."""
    for d in (exp.out, exp.results_dir):
        if d is None:
            continue
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".timings.lock", "w") as lock:
            # a POSIX record lock, not flock: a certify worker forked while this is held must not inherit it
            # (flock belongs to the open file, which the fork shares); released on close or process death
            fcntl.lockf(lock, fcntl.LOCK_EX)
            p = d / "timings.json"
            t = json.loads(p.read_text()) if p.is_file() else {}
            t[run_id] = t.get(run_id, 0.0) + seconds
            atomic_write_json(p, t)


@contextlib.contextmanager
def timed(exp: Experiment, run_id: str, every: float = 60.0):
    """Count the wall time spent inside the ``with`` block towards ``run_id`` (:func:`add_timing`), in slices
    of ``every`` seconds from a background thread, so a run killed hours in (a session's end, SIGKILL) loses
    at most one slice instead of all of it; the rest is added when the block exits, by error or interrupt too."""
    stop = threading.Event()
    last = [time.monotonic()]
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            now = time.monotonic()
            elapsed, last[0] = now - last[0], now
        if elapsed > 0:
            add_timing(exp, run_id, elapsed)

    def beat() -> None:
        while not stop.wait(every):
            try:
                flush()
            except OSError:  # a full or read-only disk must not kill the run; the final flush reports it
                pass

    thread = threading.Thread(target=beat, name=f"timing-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        flush()
