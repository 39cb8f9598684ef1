"""The fast base classifier: what ``smoothtransfer certify`` does to a model, as one library call.

:func:`prepare` returns a :class:`FastClassifier` wrapping the model with the settings measured fastest by
``benchmarks/certify_throughput.py``; :class:`~smoothtransfer.smoothing.Smooth` applies it by default
(``fast=True``), so ``Smooth(model, K, sigma).certify(...)`` from Python runs like the CLI:

* **channels_last weights** (oneDNN's NHWC convolutions on CPUs, cuDNN's tensor-core layout on GPUs); the
  sampler then writes the noisy batch in the same layout. Changes predictions only by float rounding.
* **cache-sized forward batches on CPUs**: whatever batch the caller asks for (Cohen et al.'s 400, 1000),
  the model sees micro-batches of :func:`~smoothtransfer.smoothing.sampling.default_batch_size` (128 at
  32 px, 16 at 224 px), whose activations stay in cache. Evaluation-mode models treat samples independently,
  so this changes only speed; the noise stream is independent of the batch size anyway.
* **bf16 autocast where the hardware has bf16 matrix units** (``amp="auto"``): CPUs with AMX-BF16 (Intel
  Xeon 4th generation and later) and CUDA devices that support bf16. Elsewhere float32, since bf16 without
  matrix units is no faster (measured on an AVX-512-BF16 EPYC: no clear gain). The noisy input is formed in
  float32 by the sampler and cast inside :meth:`FastClassifier.forward`: the cast is part of the base
  classifier (soundness rule 6), so the certificates are exactly as sound as in float32 — for the bf16
  classifier, whose predictions may differ from the float32 model's near its decision boundaries. Pass
  ``amp=None`` (``Smooth(..., amp_dtype=torch.float32)``) for float32 results that are the same on every
  machine.
* optionally **torch.compile** (``compile=True``: Inductor with frozen weights, see
  :func:`~smoothtransfer.smoothing.sampling.compile_for_inference`); it pays off for large ``n`` or many
  images, since the first calls compile.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.sampling import compile_for_inference, default_batch_size

__all__ = ["AMP_AUTO", "FastClassifier", "cpu_has_amx_bf16", "prepare", "resolve_amp"]

#: ``amp="auto"``: bf16 where the device has bf16 matrix units, else float32.
AMP_AUTO = "auto"

_AMP_NAMES = {"none": None, "fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16 tile units (``amx_bf16`` in Linux's ``/proc/cpuinfo`` flags) and
    torch can use oneDNN; False elsewhere (other operating systems included)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags and torch.backends.mkldnn.is_available()


def resolve_amp(amp: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: ``torch.bfloat16``/``torch.float16``, or None for float32.

    ``amp``: ``"auto"`` (bf16 on CUDA devices that support it and on CPUs with AMX-BF16, else float32),
    a dtype, None, or a name (``"none"``, ``"fp32"``, ``"bf16"``, ``"fp16"``).
    """
    device = torch.device(device)
    if isinstance(amp, str):
        key = amp.strip().lower()
        if key == AMP_AUTO:
            if device.type == "cuda":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
            if device.type == "cpu":
                return torch.bfloat16 if cpu_has_amx_bf16() else None
            return None
        if key not in _AMP_NAMES:
            raise UserError(f"amp must be 'auto', 'none', 'bf16' or 'fp16', got {amp!r}")
        return _AMP_NAMES[key]
    if amp is None or amp == torch.float32:
        return None
    if amp in (torch.bfloat16, torch.float16):
        return amp
    raise UserError(f"amp must be 'auto', None, torch.bfloat16 or torch.float16, got {amp!r}")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class FastClassifier(nn.Module):
    """A base classifier prepared by :func:`prepare`: ``(B,C,H,W)`` in [0,1] (+ noise) -> float32 logits.

    ``forward`` runs the wrapped model under ``autocast(amp_dtype)`` (None: float32), in micro-batches of at
    most ``micro_batch`` samples (None: the whole batch; ``"auto"``: the CPU's cache-sized batch for the
    input's image size, the whole batch on GPUs). The input should be float32: the cast happens in here.

    Attributes:
        model: the model as given (weights now ``channels_last`` if prepared so).
        amp_dtype: ``torch.bfloat16``/``torch.float16`` or None.
        micro_batch: ``"auto"``, an int, or None.
        compiled: whether forward runs a ``torch.compile``-d copy of ``model`` (same weights).
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None, micro_batch: int | str | None = "auto",
                 compiled: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.micro_batch = micro_batch
        # Not a registered submodule: it shares ``model``'s parameters and would list them twice.
        self.__dict__["_compiled"] = compiled
        self.spec = getattr(model, "spec", None)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _chunk(self, x: torch.Tensor) -> int | None:
        if self.micro_batch == "auto":
            return default_batch_size(x.device, int(x.shape[-1])) if x.device.type == "cpu" else None
        return self.micro_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._compiled if self._compiled is not None else self.model
        if self.amp_dtype is None:
            ctx = contextlib.nullcontext()
        else:
            ctx = torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)
        chunk = self._chunk(x)
        with ctx:
            if chunk is not None and x.shape[0] > chunk:
                logits = torch.cat([run(part) for part in x.split(chunk)])
            else:
                logits = run(x)
        return logits.float()

    def extra_repr(self) -> str:
        return f"amp_dtype={self.amp_dtype}, micro_batch={self.micro_batch}, compiled={self.compiled}"


def prepare(model: nn.Module, *, amp: str | torch.dtype | None = AMP_AUTO, compile: bool = False,
            channels_last: bool = True, micro_batch: int | str | None = "auto") -> FastClassifier:
    """The fast base classifier for certification: the CLI's speed-ups, as one call.

    Puts ``model``'s weights in ``channels_last`` (in place, like ``.to``; its train/eval flags are left as
    they are: :class:`~smoothtransfer.smoothing.Smooth` runs it in eval mode for each call), and wraps it in
    a :class:`FastClassifier` with the autocast dtype ``resolve_amp(amp, device)`` (``"auto"``: bf16 on CPUs
    with AMX-BF16 and on CUDA, else float32), cache-sized micro-batches on CPUs, and with ``compile=True`` a
    ``torch.compile``-d forward. A :class:`FastClassifier` is returned as it is. Use the result wherever a
    base classifier goes, e.g. ``Smooth(prepare(model, compile=True), K, sigma)``. See the module docstring
    for what each setting buys and why certificates stay sound.
    """
    if isinstance(model, FastClassifier):
        return model
    if not isinstance(model, nn.Module):
        raise UserError(f"prepare needs a torch.nn.Module, got {type(model).__name__}")
    if not (micro_batch is None or micro_batch == "auto"
            or (isinstance(micro_batch, int) and not isinstance(micro_batch, bool) and micro_batch >= 1)):
        raise UserError(f"micro_batch must be 'auto', None or a positive integer, got {micro_batch!r}")
    amp_dtype = resolve_amp(amp, _device_of(model))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    compiled = compile_for_inference(model) if compile else None
    return FastClassifier(model, amp_dtype, micro_batch, compiled)
