"""Small helpers shared across the package (device choice, seeding, atomic writes, run metadata)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoothtransfer.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:  # pragma: no cover - torch's message is already specific
        raise UserError(f"unknown device '{name}': {e}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace`` (no half-written file on kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; results are meant to be shared like any other file (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


#: errno values that mean "this file cannot be written here" (read-only, no permission, disk or quota full)
WRITE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_error(e: OSError, path: str | os.PathLike | None = None, kept: str = "") -> UserError:
    """One line for a failed write: which file, why (``Read-only file system``, ``No space left on device``),
    and ``kept`` (what is safe, e.g. "rows written so far are kept; rerun to resume")."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"cannot write {where}: {reason}" + (f"; {kept}" if kept else ""))


def write_if_changed(path: str | os.PathLike, data: str | bytes) -> bool:
    """Atomically write ``data`` unless ``path`` already holds exactly it; returns whether it wrote.

    A rerun that produces the same file then writes nothing, so it also succeeds in a read-only directory.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        if path.read_bytes() == raw:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, raw)
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (worker processes stopped, files closed)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While active, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread instead of
    killing the process on the spot. Does nothing off the main thread or when SIGTERM already has a handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def git_revision() -> str:
    """The git revision of the source checkout (``unknown`` outside git), with ``-dirty`` if modified."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_info() -> dict[str, Any]:
    """The CPU model and the matrix/vector units that decide whether bf16 autocast pays on this CPU.

    ``bf16_units``: ``"amx"`` (AMX-BF16 tiles: bf16 matmuls/convolutions run several times faster than fp32),
    ``"avx512_bf16"`` (bf16 dot products in AVX-512 registers only), or ``None``. Linux ``/proc/cpuinfo``;
    elsewhere the model is ``platform.processor()`` and no bf16 units are assumed.
    """
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", platform.processor()):
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    units = "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)
    return {"model": model, "bf16_units": units, "avx512": "avx512f" in flags}


def auto_amp(device: torch.device, training: bool = False) -> str:
    """What ``amp: auto`` means on ``device``: ``"bf16"`` or ``"none"``.

    CUDA: bf16 where the GPU supports it. CPU with AMX: bf16 (training a CIFAR ResNet-20 1.5-1.6x faster than
    fp32, certification 2-3x; 2-core Xeon, ``benchmarks/train_throughput.py`` / ``certify_throughput.py``).
    CPU with only AVX512-BF16 (``training=True``): bf16 for training, where it measured 1.99x (BatchNorm; 1.64x
    compiled) and 1.72x (LayerNorm) fp32 for a ResNet-20 and 1.53x for the tiny diffusion UNet (2-core AMD EPYC,
    2026-12-07, ``benchmarks/results/train_throughput_epyc-avx512bf16_2026-12-07.txt``); fp32 for
    certification (``training=False``), where bf16 measured within 10% of fp32 on that kind of CPU and is
    not worth its coarser logits. Elsewhere bf16 is emulated and slower: fp32.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        units = cpu_info()["bf16_units"]
        if units == "amx" or (training and units == "avx512_bf16"):
            return "bf16"
    return "none"


#: autocast dtypes by the names configs and run records use (``none``: full precision)
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device, training: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``auto`` | ``none`` | ``bf16`` | ``fp16``) on ``device``; ``training``
    picks :func:`auto_amp`'s rule for training steps (the trainers) rather than inference (certification)."""
    return AMP_DTYPES[auto_amp(device, training) if amp == "auto" else amp]


def amp_name(dtype: torch.dtype | None) -> str:
    """The name of an autocast dtype (``none`` | ``bf16`` | ``fp16``), as configs and run records write it."""
    if dtype == torch.float32:  # full precision asked for by its dtype
        return "none"
    return next((k for k, v in AMP_DTYPES.items() if v == dtype), str(dtype))


def environment_info() -> dict[str, Any]:
    """What a run directory records about the machine and software."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_info()["model"],
        "cpu_bf16_units": cpu_info()["bf16_units"],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# Process-wide switch for progress bars that sit below the command layer (dataset decoding, attacks);
# the CLI turns it off for --no-progress so logs stay readable.
_PROGRESS = True


def set_progress(enabled: bool) -> None:
    global _PROGRESS
    _PROGRESS = bool(enabled)


def progress_enabled() -> bool:
    return _PROGRESS
