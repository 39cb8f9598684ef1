"""Certification throughput: ``smoothtransfer.smoothing.Smooth.certify`` vs Cohen et al.'s original code.

Both run CERTIFY (``n0`` selection + ``n`` estimation samples) on the same randomly initialised model and the
same images, in one process, alternating image by image so that machine load affects both alike. The
reference is a faithful copy of ``core.py`` from github.com/locuslab/smoothing: fp32, ``torch.no_grad``,
``x.repeat`` + ``torch.randn_like`` per batch of 400, ``predictions.cpu().numpy()`` (a host sync per batch)
and a Python loop counting the votes. Ours: ``torch.inference_mode``, noise drawn into reused buffers, votes
counted on the device (one host sync per image), ``channels_last`` model and inputs, and a batch size chosen
for the device (CPU caches favour small batches).

Rows: ``ours (CLI)`` is the path ``smoothtransfer certify`` takes (the command prepares the model; ``--amp``
explicit, default float32). ``python API`` is what a library user writes, ``Smooth(model, K, sigma).certify(x,
n0, n, alpha, 400)`` on an untouched copy of the model, with Cohen's batch size and every other setting left
at its default (``fast=True``: channels_last, cache-sized micro-batches, bf16 where the CPU has AMX-BF16 or on
CUDA; the header says which amp that chose); with ``--compile`` also ``Smooth(prepare(model, compile=True),
...)``. The header names the processor.

Usage::

    PYTHONPATH=src python benchmarks/certify_throughput.py                        # CPU defaults, ~2-3 min
    PYTHONPATH=src python benchmarks/certify_throughput.py --threads 1 --ablation  # what each setting buys
    PYTHONPATH=src python benchmarks/certify_throughput.py --threads 1 --compile --peak  # vs the FMA floor
    PYTHONPATH=src python benchmarks/certify_throughput.py --machine --compile     # all cores, both sides
    PYTHONPATH=src python benchmarks/certify_throughput.py --device cuda --amp bf16 --compile --n 100000

Measured on a 2-core AMD EPYC with AVX-512 (2026-12-02, idle), ``--threads 1 --compile --peak
--models resnet20,resnet110``::

    single-core fp32 FMA peak (fma_peak.c): 220.5 GFLOP/s
    model        px    n0+n  img variant                     bs  samples/s  ratio  s/img@100k  GFLOP/s  %peak
    resnet20     32    2100    2 cohen (ref)                400      626.1   1.00       159.9     51.1    23%
    resnet20     32    2100    2 ours                       128     1164.5   1.86        86.0     95.1    43%
    resnet20     32    2100    2 ours+compile               128     1458.9   2.33        68.6    119.1    54%
    resnet110    32     700    2 cohen (ref)                400      145.1   1.00       690.1     73.4    33%
    resnet110    32     700    2 ours                       128      260.3   1.79       384.5    131.8    60%
    resnet110    32     700    2 ours+compile               128      295.6   2.04       338.7    149.6    68%

and ``--machine --compile --models resnet20,resnet110`` on the same box::

    resnet20     32    2100    4 cohen (ref) 2thr           400      878.5   1.00       113.9     71.7
    resnet20     32    2100    4 ours 2proc x1thr+compile   128     2238.7   2.55        44.7    182.7
    resnet110    32     700    4 cohen (ref) 2thr           400      208.7   1.00       479.5    105.7
    resnet110    32     700    4 ours 2proc x1thr+compile   128      533.7   2.56       187.6    270.2

Measured earlier on a 2-core AMD EPYC with AVX2 only (idle), ``--threads 1 --compile --peak``::

    single-core fp32 FMA peak (fma_peak.c): 37.8 GFLOP/s
    model        px    n0+n  img variant                     bs  samples/s  ratio  s/img@100k  GFLOP/s  %peak
    resnet20     32    2100    2 cohen (ref)                400      281.1   1.00       356.1     22.9    61%
    resnet20     32    2100    2 ours                       128      364.8   1.30       274.4     29.8    79%
    resnet20     32    2100    2 ours+compile               128      391.7   1.39       255.5     32.0    85%
    resnet110    32     700    2 cohen (ref)                400       47.6   1.00      2104.9     24.1    64%
    resnet110    32     700    2 ours                       128       57.0   1.20      1757.5     28.8    76%
    resnet110    32     700    2 ours+compile               128       66.5   1.40      1504.9     33.7    89%

and ``--machine --compile --peak`` (the reference with both cores as intra-op threads, ours as two
single-threaded forked processes)::

    resnet20     32    2100    4 cohen (ref) 2thr           400      365.1   1.00       274.2     29.8
    resnet20     32    2100    4 ours 2proc x1thr+compile   128      495.8   1.36       201.9     40.5
    resnet110    32     700    4 cohen (ref) 2thr           400       73.4   1.00      1364.4     37.1
    resnet110    32     700    4 ours 2proc x1thr+compile   128       96.3   1.31      1039.8     48.7

What helped on both CPUs: ``channels_last`` (oneDNN's NHWC convolutions), small batches (128 for 32 px, 16 for
224 px instead of 400: activations stay in cache), Inductor with frozen weights (``--compile``), and one
process per core. What bounds it: on the AVX2 box the reference already ran at ~60% of the FMA peak, ours at
85-89%, so no fp32 implementation can be 2x faster there; on the AVX-512 box the reference uses only 23-33% of
the (twice as wide) FMA peak, which leaves the room for 2.0-2.6x. ``inference_mode`` vs ``no_grad`` and removing the per-batch host
sync / Python counting loop are within noise on CPU; they matter on GPUs, where a host sync stalls the launch
queue once per batch. The clock of the shared AVX2 CPU moved between runs (FMA peak 25-39 GFLOP/s), so only
ratios from one run are comparable.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import (
    Smooth,
    clopper_pearson_lower,
    compile_for_inference,
    default_batch_size,
    prepare,
    prepare_for_inference,
    resolve_amp,
)
from smoothtransfer.utils import resolve_device

# Per-model defaults: input size, and (n0, n, images) on CPU so the default run takes ~2-3 minutes.
MODEL_DEFAULTS = {
    "resnet20": dict(input_size=32, cpu=(100, 2000, 2)),
    "resnet56": dict(input_size=32, cpu=(100, 2000, 1)),
    "resnet110": dict(input_size=32, cpu=(100, 600, 2)),
    "resnet18": dict(input_size=32, cpu=(100, 1000, 1)),
    "resnet50": dict(input_size=224, cpu=(10, 70, 1)),
    "wrn28_10": dict(input_size=32, cpu=(10, 100, 1)),
}


class CohenSmooth:
    """A faithful copy of Cohen et al.'s ``core.Smooth.certify`` (only ``device='cuda'`` made ``x.device``)."""

    ABSTAIN = -1

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float) -> None:
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        from scipy.stats import norm

        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_a_hat = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        n_a = counts_estimation[c_a_hat].item()
        # statsmodels' proportion_confint(nA, N, alpha=2*alpha, method="beta")[0] is exactly this.
        p_a_bar = clopper_pearson_lower(n_a, n, alpha)
        if p_a_bar < 0.5:
            return CohenSmooth.ABSTAIN, 0.0
        return c_a_hat, self.sigma * norm.ppf(p_a_bar)

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch, device=x.device) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts


@dataclass
class Variant:
    name: str
    batch_size: int | None
    channels_last: bool
    reference: bool = False
    compiled: bool = False
    python_api: bool = False  # Smooth(model, K, sigma) with its defaults on an untouched copy of the model
    key: str = ""  # for --variants: cohen, cli, cli+compile, py, py+compile, ablation


def _test_images(args: argparse.Namespace, count: int, size: int, device: torch.device) -> torch.Tensor:
    """``count`` images: random, or with ``--dataset`` spread evenly over its test split."""
    if not args.dataset:
        return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    from smoothtransfer.data.datasets import get_dataset

    ds = get_dataset(args.dataset, "test", root=args.data_root)
    idx = [round(i * len(ds) / count) for i in range(count)]
    xs = torch.stack([torch.as_tensor(ds[i][0], dtype=torch.float32) for i in idx])
    if tuple(xs.shape[1:]) != (3, size, size):
        raise UserError(f"--dataset {args.dataset} has {tuple(xs.shape[1:])} images; the model takes 3x{size}x{size}")
    return xs.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(name: str, num_classes: int, device: torch.device) -> nn.Module:
    from smoothtransfer.models import factory  # imported late: a missing/unfinished factory is reported

    size = MODEL_DEFAULTS.get(name, {}).get("input_size", 32)
    return factory.create_classifier(name, num_classes=num_classes, input_size=size).to(device).eval()


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    base = _build(name, args.num_classes, device)
    size = MODEL_DEFAULTS.get(name, {}).get("input_size", 32)
    cpu_n0, cpu_n, cpu_images = MODEL_DEFAULTS.get(name, {}).get("cpu", (100, 2000, 2))
    on_cpu = device.type == "cpu"
    n0 = args.n0 if args.n0 is not None else (cpu_n0 if on_cpu else 100)
    n = args.n if args.n is not None else (cpu_n if on_cpu else 100_000)
    images = args.images if args.images is not None else (cpu_images if on_cpu else 10)
    ours_bs = args.batch_size or default_batch_size(device, size)

    py_amp = resolve_amp("auto", device)
    py_tag = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[py_amp]
    py_bs = None if str(args.py_batch_size).lower() == "auto" else int(args.py_batch_size)
    py_name = f"python API bs{py_bs or 'auto'} {py_tag}"
    variants = [Variant("cohen (ref)", 400, False, reference=True, key="cohen"),
                Variant("ours (CLI)", ours_bs, True, key="cli"),
                Variant(py_name, py_bs, False, python_api=True, key="py")]
    if args.compile:
        variants.append(Variant("ours (CLI)+compile", ours_bs, True, compiled=True, key="cli+compile"))
        variants.append(Variant(f"{py_name}+compile", py_bs, False, compiled=True, python_api=True, key="py+compile"))
    if args.ablation:
        variants += [Variant("ours bs400 NCHW", 400, False, key="ablation"),
                     Variant("ours bs400 NHWC", 400, True, key="ablation"),
                     Variant(f"ours bs{ours_bs} NCHW", ours_bs, False, key="ablation")]
    if args.variants:
        wanted = {k.strip() for k in args.variants.split(",")} | {"cohen"}  # the reference is every ratio's base
        variants = [v for v in variants if v.key in wanted]
    ref_images = min(images, args.ref_images or images)
    models = {}
    for v in variants:
        key = (v.channels_last, v.compiled, v.python_api)
        if key in models:
            continue
        if v.python_api:
            # What a Python user writes: Smooth(model, K, sigma), or Smooth(prepare(model, compile=True), K, sigma)
            m = copy.deepcopy(base)
            models[key] = Smooth(prepare(m, compile=True) if v.compiled else m, args.num_classes, args.sigma)
        else:
            m = prepare_for_inference(copy.deepcopy(base), channels_last=v.channels_last)
            models[key] = compile_for_inference(m) if v.compiled else m
    xs = _test_images(args, images, size, device)

    def certify(v: Variant, x: torch.Tensor, n0_: int, n_: int) -> tuple[int, float]:
        model = models[(v.channels_last, v.compiled, v.python_api)]
        if v.reference:
            return CohenSmooth(model, args.num_classes, args.sigma).certify(x, n0_, n_, args.alpha, v.batch_size)
        if v.python_api:
            return model.certify(x, n0_, n_, args.alpha, v.batch_size)  # a Smooth with its defaults
        # the CLI's path (smoothing.runner): a model prepared by the command, explicit --amp, fast=False
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        return Smooth(model, args.num_classes, args.sigma, amp_dtype=amp, fast=False).certify(
            x, n0_, n_, args.alpha, v.batch_size)

    for v in variants:  # warm-up: oneDNN/cuDNN primitives (and compiled graphs) for the timed batch shapes
        # a compiled model sees every batch shape of a full run (full batch, n0 and n remainders) here
        certify(v, xs[0], n0, n if v.compiled or v.batch_size is None else min(n, v.batch_size))
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    preds: dict[str, list[int]] = {v.name: [] for v in variants}
    for i in range(images):
        order = variants if i % 2 == 0 else variants[::-1]  # alternate so drifting load hits all alike
        for v in order:
            if v.reference and i >= ref_images:
                continue  # --ref-images: the (slow) reference certifies only the first images
            _sync(device)
            t0 = time.perf_counter()
            pred, _ = certify(v, xs[i], n0, n)
            _sync(device)
            times[v.name].append(time.perf_counter() - t0)
            preds[v.name].append(pred)
    per_image = n0 + n
    out = {"model": name, "px": size, "n0": n0, "n": n, "images": images, "variants": {}}
    for v in variants:
        total = sum(times[v.name])
        rate = per_image * len(times[v.name]) / total
        out["variants"][v.name] = dict(batch_size=v.batch_size or "auto", channels_last=v.channels_last,
                                       samples_per_s=rate, s_per_image=total / len(times[v.name]),
                                       s_per_image_100k=(100_000 + 100) / rate, images=len(times[v.name]),
                                       key=v.key, preds=preds[v.name])
    return out


# --------------------------------------------------------------------------------------- whole machine
# Forked workers find their model and images here (set by the parent just before it forks the pool).
_POOL: dict = {}


def _pool_init(barrier, warm_n: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    model, xs, a = _POOL["model"], _POOL["xs"], _POOL["args"]
    if _POOL["compile"]:
        model = _POOL["model"] = compile_for_inference(model)
    # warm-up (oneDNN primitives, compiled graphs for every batch shape), untimed
    Smooth(model, a.num_classes, a.sigma, fast=False).certify(xs[0], _POOL["n0"], warm_n, a.alpha, _POOL["bs"])
    barrier.wait()


def _pool_certify(i: int) -> int:
    a = _POOL["args"]
    return Smooth(_POOL["model"], a.num_classes, a.sigma, fast=False).certify(
        _POOL["xs"][i], _POOL["n0"], _POOL["n"], a.alpha, _POOL["bs"])[0]


def processor_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name and whether it has AMX-BF16 / AVX-512."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name, flags = platform.processor() or "unknown CPU", []
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    units = [u for u in ("amx_bf16", "avx512_bf16", "avx512f") if u in flags]
    return f"{name}; {' '.join(units) or 'no AVX-512'}"


def cpu_fma_peak(seconds: float = 1.0) -> float | None:
    """Single-core fp32 FMA peak in GFLOP/s from ``fma_peak.c`` (beside this file), if a C compiler is here."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = Path(__file__).with_name("fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "fma_peak"
        # -march=native: AVX-512 FMAs where the CPU has them (as oneDNN uses), else AVX2
        built = subprocess.run([cc, "-O2", "-march=native", str(src), "-o", str(exe)], capture_output=True)
        if built.returncode != 0:
            built = subprocess.run([cc, "-O2", "-mavx2", "-mfma", str(src), "-o", str(exe)], capture_output=True)
        if built.returncode != 0:
            return None
        res = subprocess.run([str(exe), str(seconds)], capture_output=True, text=True)
        try:
            return float(res.stdout.split()[0])
        except (IndexError, ValueError):
            return None


def model_flops(model: nn.Module, size: int) -> float:
    """Forward FLOPs of one image (torch's FlopCounterMode: 2 per multiply-add of convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    return float(fc.get_total_flops())


def run_machine(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The whole CPU: Cohen's code as released (one process, torch's default threads = every core, batch 400)
    vs ours (one single-threaded forked process per core, each certifying its own images: ``certify --workers``)
    vs the Python API as a user calls it (``Smooth(model, K, sigma).certify(x, n0, n, alpha, 400)`` in this
    process, every core as intra-op threads; with ``--compile`` on ``prepare(model, compile=True)``).
    Mirrored phases (ref, ours, py, py, ours, ref) so that drifting load hits all alike; rates = samples / wall."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    workers = args.workers or cores
    torch.manual_seed(args.seed)
    base = _build(name, args.num_classes, device)
    size = MODEL_DEFAULTS.get(name, {}).get("input_size", 32)
    cpu_n0, cpu_n, _ = MODEL_DEFAULTS.get(name, {}).get("cpu", (100, 2000, 2))
    n0 = args.n0 if args.n0 is not None else cpu_n0
    n = args.n if args.n is not None else cpu_n
    per_phase = args.images if args.images is not None else workers
    bs = args.batch_size or default_batch_size(device, size)
    xs = torch.rand(2 * per_phase, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    ref_model = prepare_for_inference(copy.deepcopy(base), channels_last=False)
    _POOL.update(model=prepare_for_inference(copy.deepcopy(base)), xs=xs, args=args, n0=n0, n=n, bs=bs,
                 compile=args.compile)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers + 1)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_pool_init,
                               initargs=(barrier, n if args.compile else min(n, bs)))
    try:
        pool.submit(int, 0)  # starts the workers; each warms up, then waits here for the others
        barrier.wait()
        torch.set_num_threads(cores)
        CohenSmooth(ref_model, args.num_classes, args.sigma).certify(xs[0], n0, min(n, 400), args.alpha, 400)
        py_base = copy.deepcopy(base)
        py = Smooth(prepare(py_base, compile=True) if args.compile else py_base, args.num_classes, args.sigma)
        py.certify(xs[0], n0, n if args.compile else min(n, 400), args.alpha, 400)  # warm-up (compiles)
        wall = {"cohen (ref)": 0.0, "ours": 0.0, "py": 0.0}
        preds: dict[str, list[int]] = {"cohen (ref)": [], "ours": [], "py": []}
        for phase, kind in enumerate(["cohen (ref)", "ours", "py", "py", "ours", "cohen (ref)"]):
            half = phase // 3  # each certifies images A in phases 0-2 and images B in phases 3-5
            idx = list(range(half * per_phase, (half + 1) * per_phase))
            t0 = time.perf_counter()
            if kind == "ours":
                got = list(pool.map(_pool_certify, idx))
            elif kind == "py":
                got = [py.certify(xs[i], n0, n, args.alpha, 400)[0] for i in idx]
            else:
                got = [CohenSmooth(ref_model, args.num_classes, args.sigma).certify(xs[i], n0, n, args.alpha, 400)[0]
                       for i in idx]
            wall[kind] += time.perf_counter() - t0
            preds[kind] += got
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _POOL.clear()
    samples = 2 * per_phase * (n0 + n)
    out = {"model": name, "px": size, "n0": n0, "n": n, "images": 2 * per_phase, "cores": cores,
           "flops_per_sample": model_flops(ref_model, size), "variants": {}}
    py_tag = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[py.amp_dtype]
    for kind, label, bsz, threads in (("cohen (ref)", f"cohen (ref) {cores}thr", 400, f"{cores} threads"),
                                      ("ours", f"ours (CLI) {workers}proc x1thr" + ("+compile" if args.compile else ""),
                                       bs, f"{workers} procs x 1 thread"),
                                      ("py", f"python API {cores}thr {py_tag}" + ("+compile" if args.compile else ""),
                                       400, f"{cores} threads")):
        rate = samples / wall[kind]
        out["variants"][label] = dict(batch_size=bsz, samples_per_s=rate, s_per_image_100k=(100_000 + 100) / rate,
                                      preds=preds[kind], threads=threads)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet110,resnet50",
                   help="comma-separated create_classifier names (resnet50 runs at 224 px)")
    p.add_argument("--n", type=int, default=None, help="estimation samples (default: per model on CPU, 100k on GPU)")
    p.add_argument("--n0", type=int, default=None, help="selection samples (default: per model on CPU, 100 on GPU)")
    p.add_argument("--images", type=int, default=None, help="images per model (default: per model)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="our batch size (default: 128 for 32 px / 16 for 224 px on CPU, 1000 / 200 on GPU); "
                        "the reference always uses Cohen's 400")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="run OUR base classifier under autocast (changes the classifier; off for a fair ratio)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile (compile time is paid in the untimed warm-up)")
    p.add_argument("--ablation", action="store_true", help="also time ours with Cohen's batch size / NCHW")
    p.add_argument("--machine", action="store_true",
                   help="CPU, whole machine: Cohen's code with every core as intra-op threads vs ours with one "
                        "single-threaded worker process per core (certify --workers); ABBA phases, wall-clock rates")
    p.add_argument("--workers", type=int, default=None, help="with --machine: worker processes (default: cores)")
    p.add_argument("--peak", action="store_true",
                   help="CPU: also measure the single-core fp32 FMA peak (fma_peak.c, needs a C compiler) and "
                        "print each rate as a fraction of it")
    p.add_argument("--py-batch-size", default="400",
                   help="batch size the python API rows pass to Smooth.certify: an integer (default 400, Cohen's), "
                        "or auto (None: chosen for the device)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of cohen,cli,cli+compile,py,py+compile,ablation (cohen is always run)")
    p.add_argument("--ref-images", type=int, default=None,
                   help="the reference certifies only the first K images (its rate is per sample: still comparable)")
    p.add_argument("--dataset", default=None,
                   help="certify images of this dataset's test split (spread evenly) instead of random ones")
    p.add_argument("--data-root", default=None, help="with --dataset: the datasets folder")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotune once (applies to both)
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"device={device} ({processor_name(device)}) threads={torch.get_num_threads()} load={load:.1f} "
              f"torch={torch.__version__} sigma={args.sigma} alpha={args.alpha} amp (CLI rows)={args.amp}, "
              f"python API amp auto={resolve_amp('auto', device)}", flush=True)
        if args.machine and device.type != "cpu":
            raise UserError("--machine compares whole CPUs; on a GPU use the default mode")
        peak = cpu_fma_peak() if (args.peak and device.type == "cpu") else None
        if args.peak and device.type == "cpu":
            print(f"single-core fp32 FMA peak (fma_peak.c): "
                  f"{'n/a (no C compiler)' if peak is None else f'{peak:.1f} GFLOP/s'}", flush=True)
        print(f"{'model':<10} {'px':>4} {'n0+n':>7} {'img':>4} {'variant':<30} {'bs':>5} {'samples/s':>10} "
              f"{'ratio':>6} {'s/img@100k':>11} {'GFLOP/s':>8}" + (f" {'%peak':>6}" if peak else ""), flush=True)
        results = []
        for name in names:
            t0 = time.perf_counter()
            r = run_machine(name, args, device) if args.machine else run_model(name, args, device)
            results.append(r)
            flops = r.get("flops_per_sample")
            if flops is None:
                torch.manual_seed(args.seed)
                flops = model_flops(_build(name, args.num_classes, device), r["px"])
            ref = next(iter(r["variants"].values()))["samples_per_s"]
            for vname, v in r["variants"].items():
                gflops = v["samples_per_s"] * flops / 1e9
                # % of the FMA peak of the cores the variant used (one per thread or process)
                used = r.get("cores", args.threads or torch.get_num_threads()) if args.machine else (
                    args.threads or torch.get_num_threads())
                pct = f" {100 * gflops / (peak * used):>5.0f}%" if peak else ""
                v["ratio"] = v["samples_per_s"] / ref
                print(f"{name:<10} {r['px']:>4} {r['n0'] + r['n']:>7} {v.get('images', r['images']):>4} {vname:<30} "
                      f"{v['batch_size']:>5} {v['samples_per_s']:>10.1f} {v['ratio']:>6.2f} "
                      f"{v['s_per_image_100k']:>11.2f} {gflops:>8.1f}{pct}", flush=True)
            print(f"{'':<10} ({time.perf_counter() - t0:.0f} s wall; {flops / 1e9:.4f} GFLOP/sample; predictions "
                  f"{ {k: v['preds'] for k, v in r['variants'].items()} })", flush=True)
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"device": str(device), "processor": processor_name(device), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "args": vars(args), "results": results}, f,
                          indent=2, default=str)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
