"""Monte-Carlo vote counting under Gaussian noise: the only code in the package that calls the base model.

For an image ``x`` of shape ``(C,H,W)`` in [0,1] pixel space, :func:`sample_counts` draws ``num`` noise
samples ``delta ~ N(0, sigma^2 I)`` and counts the base classifier's votes ``argmax f(x + delta)``.

Design decisions (each one is tested in ``tests/smoothing/test_smooth.py``):

* **Noise is a fixed-chunk stream.** Noise is drawn in float32 on ``x``'s device with
  ``torch.randn(generator=...)`` in chunks of :data:`NOISE_CHUNK` samples, whatever the batch size; forward
  batches are cut from that stream. So under one seeded generator the noise — and hence the counts — are
  the same for any ``batch_size`` (``batch_size=num`` and ``batch_size=7`` give identical counts, up to a
  base classifier whose own float arithmetic depends on the batch size at the last ulp).
* **The cast is part of the base classifier** (soundness rule 6): ``x + sigma * delta`` is computed in
  float32; only then does ``torch.autocast(dtype=amp_dtype)`` let the model run in bf16/fp16.
* **No host sync per batch.** Votes are accumulated on the device with ``Tensor.index_add_``; nothing in
  the loop calls ``.item()``/``.cpu()``. (``torch.bincount`` is equivalent on CPU but on CUDA it reads the
  input's min and max back to the host on every call, i.e. one sync per batch, so it is not used.)
* **Memory format follows the model.** If the model's convolution weights are ``channels_last`` the noisy
  batch is written in ``channels_last`` too, so the first convolution needs no layout conversion. See
  :func:`prepare_for_inference` and :func:`default_batch_size` for the measured CPU settings.
* ``torch.inference_mode`` and eval mode for the whole call; the model's train/eval flags are restored.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from smoothtransfer.errors import UserError

__all__ = [
    "NOISE_CHUNK",
    "NoiseStream",
    "auto_batch_size",
    "batch_size_for_memory",
    "default_batch_size",
    "eval_mode",
    "prepare_for_inference",
    "compile_for_inference",
    "sample_counts",
    "sample_counts_multi",
    "sample_votes",
]

#: Noise is drawn in calls of exactly this many samples, independent of the forward batch size, so that
#: counts do not depend on ``batch_size``. Changing it changes the noise a given seed produces.
NOISE_CHUNK = 64

_AMP_DTYPES = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own ``training`` flag.

    Restoring per module (not ``model.train(prev)``) keeps deliberately frozen submodules, e.g. BatchNorm
    kept in eval mode during fixed-feature fine-tuning (soundness rule 9), exactly as they were.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _uses_channels_last(model: nn.Module) -> bool:
    """True when the model's first spatial convolution weight is stored ``channels_last``."""
    for p in model.parameters():
        # Skip weights whose two layouts coincide (1x1 kernels, single input channel).
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def prepare_for_inference(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """Return ``model`` in eval mode, its weights in ``channels_last`` unless told not to (in place, like ``.to``).

    Sampling notices the model's memory format and writes the noisy batch in the same layout, so this is all
    a caller needs to do. ``channels_last=None`` means True: on the 2-core CPU development box (1 thread) it
    measured +23% for ResNet-20 at batch 128, +33% at batch 400 and +41% for ResNet-50 at 224 px
    (``benchmarks/certify_throughput.py --ablation``); on GPUs it is cuDNN's preferred layout for tensor-core
    (AMP/TF32) convolutions. It changes no prediction beyond float rounding of the convolutions.
    """
    model.eval()
    if channels_last is None or channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compile_for_inference(model: nn.Module) -> nn.Module:
    """``torch.compile`` a model prepared by :func:`prepare_for_inference` for certification.

    Static shapes (``dynamic=False``): certification runs a handful of batch sizes (the full batch and the
    remainders of ``n0`` and ``n``), each compiled once. On the 2-core CPU box Inductor's fused kernels measured
    1.44x eager for ResNet-20 and 1.22x for ResNet-110 at batch 128 (one thread). Predictions change only by
    float rounding (max |Δlogit| ~4e-6 on ResNet-20). The first call pays the compile (tens of seconds on CPU),
    so it pays off for large ``n`` (e.g. N=100k) or many images, not for smoke runs. Inductor's ``freezing``
    (weights as constants: conv-BN folding, prepacked oneDNN weights; applied only under inference mode, which
    sampling uses) added ~10% for ResNet-20 on CPU; it is set for this model only, not process-wide.
    """
    return torch.compile(model, dynamic=False, options={"freezing": True})


def default_batch_size(device: torch.device | str, image_size: int) -> int:
    """A good number of noisy samples per forward pass, from the throughput benchmark.

    CPU: 128 for images up to 64 px (activations of a CIFAR ResNet batch stay in cache: ResNet-20 ran 1.49x
    faster at 128 than at Cohen's 400), 16 above (ResNet-50 at 224 px: 1.3x faster than 80 at once).
    GPU: 1000 up to 64 px, 200 above (not measured here; large enough to fill the device).
    """
    small = image_size <= 64
    if torch.device(device).type == "cpu":
        return 128 if small else 16
    return 1000 if small else 200


def batch_size_for_memory(free_bytes: int, bytes_per_sample: float, *, fraction: float = 0.5, cap: int = 4096,
                          multiple: int = 64) -> int:
    """The largest batch whose activations take at most ``fraction`` of ``free_bytes``, capped and rounded.

    Rounded down to a multiple of ``multiple`` (tensor-core friendly shapes) when that leaves at least one
    multiple, never below 1 and never above ``cap``.
    """
    if bytes_per_sample <= 0 or not math.isfinite(bytes_per_sample):
        return cap
    fit = int(fraction * free_bytes // bytes_per_sample)
    if fit >= multiple:
        fit -= fit % multiple
    return max(1, min(cap, fit))


def auto_batch_size(model: nn.Module, shape: tuple[int, ...], device: torch.device | str,
                    amp_dtype: torch.dtype | None = None, *, cap: int | None = None, probe: int = 32) -> int:
    """Samples per forward pass for certification: measured from free GPU memory on CUDA, else the CPU default.

    On CUDA one probe forward pass of ``probe`` noisy images ``shape = (C,H,W)`` (under ``inference_mode`` and
    the same autocast as sampling) measures the activation memory per sample; the batch is then sized to half
    the memory free at that moment (:func:`batch_size_for_memory`), capped at 4096 for images up to 64 px and
    512 above (larger batches no longer raise throughput; ``cap`` overrides). Elsewhere
    :func:`default_batch_size`.
    """
    device = torch.device(device)
    size = int(shape[-1])
    if device.type != "cuda":
        return default_batch_size(device, size)
    cap = cap or (4096 if size <= 64 else 512)
    fmt = torch.channels_last if (len(shape) == 3 and _uses_channels_last(model)) else torch.contiguous_format
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with eval_mode(model), torch.inference_mode(), _autocast(device, amp_dtype):
        x = torch.zeros((probe, *shape), device=device, dtype=torch.float32, memory_format=fmt)
        model(x + x)  # the input and the noisy copy, as in sampling
    torch.cuda.synchronize(device)
    per_sample = (torch.cuda.max_memory_allocated(device) - base) / probe
    del x
    torch.cuda.empty_cache()
    return batch_size_for_memory(free, per_sample, cap=cap)


def _as_int(value, name: str, minimum: int) -> int:
    try:
        v = operator.index(value)  # ints and numpy integers, not 5.0 or "5"
    except TypeError:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {v}")
    return v


def _check_common(sigma, num, batch_size, num_classes, amp_dtype) -> tuple[float, int, int, int]:
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        raise UserError(f"sigma must be a number, got {sigma!r}") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise UserError(f"sigma must be a finite number >= 0, got {sigma}")
    if amp_dtype is not None and amp_dtype not in _AMP_DTYPES and amp_dtype != torch.float32:
        raise UserError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype}")
    return (sigma, _as_int(num, "the number of noise samples", 0), _as_int(batch_size, "batch_size", 1),
            _as_int(num_classes, "num_classes", 1))


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise UserError(
            f"the random generator is on {generator.device} but the image is on {device}; "
            f"create it with torch.Generator(device='{device.type}')"
        )


class NoiseStream:
    """Standard-normal float32 noise of shape ``(m, *shape)``, drawn in fixed chunks of ``chunk`` samples.

    ``fill(out)`` writes the next ``len(out)`` samples of one infinite stream into ``out``; the stream does
    not depend on how it is cut into ``fill`` calls. Pass one as ``generator`` to the sampling functions to
    continue it across calls: sequential certification draws its stages this way, so that under one seed
    its stage ``s`` sees exactly the first ``n_s`` estimation samples of fixed-``N`` CERTIFY (a fresh call
    with a ``torch.Generator`` starts a new stream and drops the unused tail of the last chunk). Whole chunks are drawn straight into ``out``; a chunk
    straddling two calls is drawn into a scratch tensor and its unused tail kept for the next call.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None,
                 chunk: int = NOISE_CHUNK) -> None:
        self.shape = tuple(shape)
        self.device = device
        self.generator = generator
        self.chunk = chunk
        self.leftover: torch.Tensor | None = None

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        m, i = out.shape[0], 0
        if self.leftover is not None:
            take = min(m, self.leftover.shape[0])
            out[:take].copy_(self.leftover[:take])
            self.leftover = self.leftover[take:] if take < self.leftover.shape[0] else None
            i = take
        while m - i >= self.chunk:
            # out[i:i+chunk] is a contiguous slice: randn fills it exactly as it fills a fresh tensor.
            torch.randn((self.chunk, *self.shape), generator=self.generator, out=out[i:i + self.chunk])
            i += self.chunk
        if i < m:
            scratch = torch.randn((self.chunk, *self.shape), generator=self.generator, device=self.device,
                                  dtype=torch.float32)
            out[i:].copy_(scratch[: m - i])
            self.leftover = scratch[m - i:]
        return out


def _as_stream(generator, shape: tuple[int, ...], device: torch.device) -> NoiseStream:
    """The noise stream to draw from: a given :class:`NoiseStream` (continued), else a new one."""
    if isinstance(generator, NoiseStream):
        if generator.shape != tuple(shape) or generator.device.type != device.type:
            raise UserError(f"the noise stream is for shape {generator.shape} on {generator.device}, not "
                            f"{tuple(shape)} on {device}")
        return generator
    _check_generator(generator, device)
    return NoiseStream(shape, device, generator)


def _fill_per_image(streams: list[NoiseStream], out: torch.Tensor, start: int, num: int) -> torch.Tensor:
    """Fill ``out`` with samples ``start .. start+len(out)`` of the image-major sequence, image ``i``'s
    samples (``i*num .. (i+1)*num``) from ``streams[i]``."""
    i, end = start, start + out.shape[0]
    while i < end:
        image = i // num
        stop = min(end, (image + 1) * num)
        streams[image].fill(out[i - start:stop - start])
        i = stop
    return out


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None or amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _votes(model: nn.Module, batch: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``argmax`` predictions ``(B,)`` int64 of ``model`` on ``batch``; checks the logits' width."""
    logits = model(batch)
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        # Shape is metadata: this check costs no host sync.
        raise UserError(
            f"the base classifier returned logits of shape {tuple(logits.shape)}, "
            f"expected (batch, num_classes={num_classes})"
        )
    return logits.argmax(dim=1)


def sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int,
                  num_classes: int, generator: torch.Generator | None = None,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Votes of the base classifier under Gaussian noise: ``counts[c] = #{i : argmax f(x + delta_i) = c}``.

    Args:
        model: base classifier, ``(B,C,H,W)`` in [0,1] (+ noise) -> logits ``(B, num_classes)``, on ``x``'s
            device. Run in eval mode; its train/eval flags are restored afterwards.
        x: one image ``(C,H,W)``, float in [0,1] (used in float32).
        sigma: noise standard deviation in [0,1] pixel units (``>= 0``).
        num: number of noise samples ``delta_i ~ N(0, sigma^2 I)``.
        batch_size: samples per forward pass; does not change the result under a seeded ``generator``.
        num_classes: length of the returned vector; the model must output this many logits.
        generator: ``torch.Generator`` on ``x``'s device type, or None for torch's default one.
        amp_dtype: ``torch.bfloat16``/``torch.float16`` to run the model under autocast, or None.

    Returns:
        ``LongTensor (num_classes,)`` on ``x``'s device, summing to ``num``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise UserError(f"x must be one image tensor of shape (C,H,W), got shape {tuple(getattr(x, 'shape', ()))}")
    return sample_counts_multi(model, x.unsqueeze(0), sigma, num, batch_size, num_classes, generator,
                               amp_dtype)[0]


def sample_votes(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int, num_classes: int,
                 generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every vote, in order: ``votes[i] = argmax f(x + delta_i)``, ``int64 (num,)`` on ``x``'s device.

    The same noise stream as :func:`sample_counts` (``torch.bincount(sample_votes(...), minlength=K)`` equals
    ``sample_counts(...)`` under one seed), so a recorded stream can be replayed through any stopping rule —
    ``benchmarks/sequential_samples.py`` compares fixed-``N`` and sequential certification on the very same
    samples this way. Keeps ``num`` votes in memory; certification itself only ever needs the counts.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise UserError(f"x must be one image tensor of shape (C,H,W), got shape {tuple(getattr(x, 'shape', ()))}")
    sigma, num, batch_size, num_classes = _check_common(sigma, num, batch_size, num_classes, amp_dtype)
    shape = tuple(x.shape)
    stream = _as_stream(generator, shape, x.device)
    x = x.to(torch.float32)
    bs = max(1, min(batch_size, num))
    fmt = torch.channels_last if _uses_channels_last(model) else torch.contiguous_format
    votes = torch.empty(num, dtype=torch.int64, device=x.device)
    with eval_mode(model), torch.inference_mode(), _autocast(x.device, amp_dtype):
        noise = torch.empty((bs, *shape), dtype=torch.float32, device=x.device)
        batch = torch.empty((bs, *shape), dtype=torch.float32, device=x.device, memory_format=fmt)
        for start in range(0, num, bs):
            m = min(bs, num - start)
            torch.add(x, stream.fill(noise[:m]), alpha=sigma, out=batch[:m])
            votes[start:start + m] = _votes(model, batch[:m], num_classes)
    return votes


def sample_counts_multi(model: nn.Module, xs: torch.Tensor, sigma: float, num: int, batch_size: int,
                        num_classes: int,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None,
                        amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`sample_counts` for ``B`` images at once, packing their noisy copies into shared batches.

    The ``B * num`` samples are taken image-major (all of image 0, then image 1, ...) and cut into forward
    batches of ``batch_size`` that may span images — worthwhile when ``num`` is small (e.g. the ``n0``
    selection draws, or N=1000 on a GPU that takes 4000 samples per pass), where one image alone would leave
    the batch mostly empty. With ``B = 1`` this is exactly :func:`sample_counts`.

    Args:
        xs: images ``(B,C,H,W)``, float in [0,1].
        generator: one ``torch.Generator`` (a single noise stream, image-major), or a sequence of ``B``
            generators, one per image: image ``i``'s noise then comes from ``generator[i]`` alone, so its
            counts equal ``sample_counts(model, xs[i], ..., generator=generator[i])`` whatever else is packed
            with it (the runner's per-image seeds rely on this: a packed run certifies exactly like an
            unpacked one). Other arguments as in :func:`sample_counts`.

    Returns:
        ``LongTensor (B, num_classes)`` on ``xs``'s device; each row sums to ``num``.
    """
    if not isinstance(xs, torch.Tensor) or xs.dim() != 4:
        raise UserError(f"xs must be a batch of images (B,C,H,W), got shape {tuple(getattr(xs, 'shape', ()))}")
    if not xs.is_floating_point():
        raise UserError(f"images must be float tensors in [0,1], got dtype {xs.dtype}")
    sigma, num, batch_size, num_classes = _check_common(sigma, num, batch_size, num_classes, amp_dtype)
    device = xs.device
    num_images, shape = xs.shape[0], tuple(xs.shape[1:])
    per_image = generator is not None and not isinstance(generator, torch.Generator | NoiseStream)
    if per_image:
        generator = list(generator)
        if len(generator) != num_images:
            raise UserError(f"got {len(generator)} generators for {num_images} images; give one per image")
        streams = [_as_stream(g, shape, device) for g in generator]
    else:
        stream = _as_stream(generator, shape, device)
    xs = xs.to(torch.float32).contiguous()
    total = num_images * num
    bs = max(1, min(batch_size, total))
    fmt = torch.channels_last if (len(shape) == 3 and _uses_channels_last(model)) else torch.contiguous_format

    # A normal (non-inference) tensor, so callers may update it in place outside inference mode.
    counts = torch.zeros(num_images * num_classes, dtype=torch.int64, device=device)
    with eval_mode(model), torch.inference_mode(), _autocast(device, amp_dtype):
        # Buffers reused by every batch: no allocation in the loop for a single image. `noise` stays in the
        # standard layout so the stream's values never depend on the model's memory format.
        noise = torch.empty((bs, *shape), dtype=torch.float32, device=device)
        batch = torch.empty((bs, *shape), dtype=torch.float32, device=device, memory_format=fmt)
        ones = torch.ones(bs, dtype=torch.int64, device=device)
        for start in range(0, total, bs):
            m = min(bs, total - start)
            if per_image:
                delta = _fill_per_image(streams, noise[:m], start, num)
            else:
                delta = stream.fill(noise[:m])
            inp = batch[:m]
            if num_images == 1:
                # float32 x + sigma * delta, written straight into the (possibly NHWC) input buffer.
                torch.add(xs[0], delta, alpha=sigma, out=inp)
                slots = _votes(model, inp, num_classes)
            else:
                # Sample j belongs to image j // num; its vote goes to slot image * num_classes + class.
                img = torch.div(torch.arange(start, start + m, device=device), num, rounding_mode="floor")
                torch.add(xs.index_select(0, img), delta, alpha=sigma, out=inp)
                slots = _votes(model, inp, num_classes) + img * num_classes
            counts.index_add_(0, slots, ones[:m])
    return counts.view(num_images, num_classes)
