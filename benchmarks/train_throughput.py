"""Training throughput: our trainer (``smoothtransfer.train.run_training``) vs a plain PyTorch loop, one run.

Both train the same architecture (CIFAR ResNet-20, the norm you pick) on the same CIFAR-10 images held in
memory as uint8, batch 128, with random crop + flip and Gaussian-noise augmentation of the ``gaussian``
objective (σ = 0.25). The plain loop is what a user writes from the PyTorch tutorial: fp32, NCHW, SGD,
``loss.backward(); opt.step()``. Ours runs ``run_training`` with its defaults (``amp: auto`` = bf16 autocast
on CPUs with AMX-BF16 or AVX512-BF16 and on CUDA; channels_last on CUDA only) and then with ``--amp none`` (fp32) to separate
the precision from the rest (and, where auto chose fp32, with ``--amp bf16``: the measurement behind that choice); ``--compile`` adds the plain loop under ``torch.compile`` and ours with
``compile: true`` (two epochs: the second epoch's rate, and the first epoch's extra seconds as compile time).

The plain loop times steps after 3 warm-up steps; ours reports ``images_per_s`` of its training epoch
(``train_summary.json``; augmentation, noise and the optimiser step included, validation excluded).
Ratios are measured in one run on one machine; compare ratios, not figures across machines.

Usage::

    PYTHONPATH=src python benchmarks/train_throughput.py                 # ~2 min on 2 cores
    PYTHONPATH=src python benchmarks/train_throughput.py --norm layer --images 12800 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from smoothtransfer.config import DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig  # noqa: E402
from smoothtransfer.data.datasets import get_dataset  # noqa: E402
from smoothtransfer.data.transforms import random_crop_flip  # noqa: E402
from smoothtransfer.models.factory import create_classifier  # noqa: E402
from smoothtransfer.train.loop import run_training  # noqa: E402
from smoothtransfer.utils import auto_amp, cpu_info  # noqa: E402


def machine_line() -> str:
    """The header both training benchmarks print: CPU model, its bf16 units, torch, threads, and what
    ``amp: auto`` picks for training here."""
    info = cpu_info()
    return (f"CPU: {info['model']} (bf16 units: {info['bf16_units']}); torch {torch.__version__}; "
            f"{torch.get_num_threads()} threads; training amp auto → {auto_amp(torch.device('cpu'), training=True)}")


def plain_loop(x_u8: torch.Tensor, y: torch.Tensor, norm: str, batch_size: int, sigma: float,
               compile_model: bool = False) -> float:
    """Images/s of a tutorial-style fp32 training loop on the same data and model."""
    torch.manual_seed(0)
    model = create_classifier("resnet20", 10, norm=norm)
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    n = len(y)
    steps = n // batch_size
    t0 = None
    for step in range(steps):
        if step == 3:
            t0 = time.perf_counter()
        xb = x_u8[step * batch_size:(step + 1) * batch_size].float().div_(255)
        xb = random_crop_flip(xb)
        xb = xb + sigma * torch.randn_like(xb)
        loss = F.cross_entropy(model(xb), y[step * batch_size:(step + 1) * batch_size])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (steps - 3) * batch_size / (time.perf_counter() - t0)


def ours(norm: str, images: int, batch_size: int, sigma: float, amp: str, out: Path,
         compile_model: bool = False) -> tuple[float, float | None]:
    """Images/s of ``run_training``'s last epoch; with ``compile_model`` two epochs are trained and the second
    value is the first epoch's extra seconds (compiling), else None."""
    cfg = TrainConfig(
        stage="pretrain", out=str(out),
        data=DataConfig(dataset="cifar10", val_fraction=0.0, max_train=images, max_val=0),
        model=ModelConfig(arch="resnet20", norm=norm),
        objective=ObjectiveConfig(name="gaussian", params={"sigma": sigma}),
        optim=OptimConfig(name="sgd", lr=0.05), epochs=2 if compile_model else 1, batch_size=batch_size,
        eval_sigmas=(), amp=amp, compile=compile_model, checkpoint_every=0, tensorboard=False, progress=False, device="cpu",
    )
    run_training(cfg)
    summary = json.loads((out / "train_summary.json").read_text())
    hist = summary.get("history") or [summary]
    extra = float(hist[0]["seconds"]) - float(hist[-1]["seconds"]) if compile_model else None
    return float(hist[-1]["images_per_s"]), extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", default="batch", choices=["batch", "layer", "group", "instance"])
    p.add_argument("--images", type=int, default=6400, help="training images per measurement")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="also time the plain loop under torch.compile and ours with compile: true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    ds = get_dataset("cifar10", "train")
    # A seeded random subset in random order, as a shuffled DataLoader would give: the stored train split is
    # sorted by class, and its first images (all one class) drive the plain loop's loss to 0 within a few
    # steps, after which underflowing (denormal) activations made fp32 LN steps up to 20× slower (measured).
    order = torch.randperm(len(ds.targets), generator=torch.Generator().manual_seed(0))[:args.images]
    x_u8, y = ds.images[order], ds.targets[order].long()  # uint8 (N,3,32,32), int (N,)
    rows = [("plain PyTorch loop, fp32", plain_loop(x_u8, y, args.norm, args.batch_size, args.sigma), None)]
    if args.compile:
        rows.append(("plain loop + torch.compile",
                     plain_loop(x_u8, y, args.norm, args.batch_size, args.sigma, True), None))
    variants = [("ours, defaults (amp auto)", "auto", False), ("ours, --amp none (fp32)", "none", False)]
    # Where auto chose fp32 (CPUs without AMX), bf16 is timed too: the measurement behind that choice.
    forced_bf16 = auto_amp(torch.device("cpu"), training=True) == "none"
    if forced_bf16:
        variants.append(("ours, --amp bf16", "bf16", False))
    if args.compile:
        variants += [("ours, amp auto + --compile", "auto", True), ("ours, --amp none + --compile", "none", True)]
        if forced_bf16:
            variants.append(("ours, --amp bf16 + --compile", "bf16", True))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, amp, comp) in enumerate(variants):
            rows.append((name, *ours(args.norm, args.images, args.batch_size, args.sigma, amp, Path(tmp) / str(i),
                                     comp)))
    base = rows[0][1]
    print(f"ResNet-20 ({args.norm} norm), CIFAR-10, batch {args.batch_size}, {args.images} images, gaussian σ={args.sigma}")
    print(f"{'variant':34s} {'images/s':>9s} {'ratio':>6s} {'compile s':>9s}")
    for name, ips, extra in rows:
        print(f"{name:34s} {ips:9.1f} {ips / base:6.2f} {'' if extra is None else f'{extra:9.0f}'}")


if __name__ == "__main__":
    main()
