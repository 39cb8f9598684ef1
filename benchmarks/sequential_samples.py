"""Samples saved by sequential certification: ``certify_sequential`` vs fixed-N CERTIFY on the same images.

For each image both methods run (independent noise, same n0 / N / alpha / sigma); the script prints the
mean number of model evaluations per image (n0 + estimation samples), wall time, and certified accuracy on
the grid of radii. Fixed-N certified accuracy at r counts ``correct and radius >= r``; sequential counts
``correct and certified[r]``. Both are valid at level alpha; sequential pays ``alpha / num_stages`` per stage
(Bonferroni), so on hard images it can certify slightly smaller radii.

Usage::

    PYTHONPATH=src python benchmarks/sequential_samples.py --checkpoint runs/x/best.pt --dataset cifar10 \\
        --sigma 0.25 --n 100000 --max-images 100 --skip 100 --device cuda
    # smoke test without a trained model (random weights: easy, constant predictions):
    PYTHONPATH=src python benchmarks/sequential_samples.py --arch resnet20 --dataset cifar10 --n 2000 \\
        --max-images 3 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import (
    Smooth,
    certify_sequential,
    default_batch_size,
    max_certifiable_radius,
    prepare_for_inference,
)
from smoothtransfer.utils import resolve_device


def _load_model(args: argparse.Namespace, device: torch.device):
    """``(model, num_classes, dataset name or None)`` from --checkpoint, or a random --arch model."""
    if args.checkpoint:
        from smoothtransfer.train.checkpoint import load_classifier

        model, ckpt = load_classifier(args.checkpoint, device=device)
        ds = ckpt.get("dataset")
        ds_name = ds if isinstance(ds, str) else (ds or {}).get("name") if isinstance(ds, dict) else None
        return model, int(model.spec["num_classes"]), ds_name
    if not args.arch:
        raise UserError("give --checkpoint PATH (or --arch NAME for a random-weights smoke test)")
    from smoothtransfer.data.datasets import dataset_info
    from smoothtransfer.models.factory import create_classifier

    info = dataset_info(args.dataset, root=args.data_root)
    torch.manual_seed(args.seed)
    model = create_classifier(args.arch, num_classes=info.num_classes, input_size=info.image_size,
                              in_chans=info.channels, mean=info.mean, std=info.std)
    return model.to(device).eval(), info.num_classes, args.dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a smoothtransfer checkpoint (.pt)")
    p.add_argument("--arch", default=None, help="instead of --checkpoint: random weights of this model")
    p.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-root", default=None)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000, help="N: fixed-N CERTIFY's n and sequential's n_max")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--radii", default=None,
                   help="comma-separated grid (default: 0, 0.25 sigma, ... up to the N cap)")
    p.add_argument("--n-first", type=int, default=100, help="first stage size")
    p.add_argument("--growth", type=float, default=2.0, help="stage size growth factor")
    p.add_argument("--batch-size", type=int, default=None, help="default: smoothing.default_batch_size")
    p.add_argument("--skip", type=int, default=1)
    p.add_argument("--max-images", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        model, num_classes, ckpt_dataset = _load_model(args, device)
        prepare_for_inference(model, channels_last=True)
        ds_name = args.dataset or ckpt_dataset
        if not ds_name:
            raise UserError("the checkpoint names no dataset: pass --dataset")
        from smoothtransfer.data.datasets import get_dataset
        from smoothtransfer.data.subsets import evenly_spaced

        dataset = get_dataset(ds_name, args.split, root=args.data_root)
        if args.radii:
            radii = [float(r) for r in args.radii.split(",")]
        else:
            cap = max_certifiable_radius(args.sigma, args.n, args.alpha)
            radii = [round(0.25 * args.sigma * j, 6) for j in range(int(cap / (0.25 * args.sigma)) + 1)]
        bs = args.batch_size or default_batch_size(device, int(dataset[0][0].shape[-1]))
        smooth = Smooth(model, num_classes, args.sigma)
        indices = evenly_spaced(len(dataset), args.skip, args.max_images)
        grid = np.asarray(radii)
        fixed_ok = np.zeros(len(radii))
        seq_ok = np.zeros(len(radii))
        fixed_samples = seq_samples = 0
        fixed_time = seq_time = 0.0
        print(f"{ds_name}/{args.split}: {len(indices)} images, sigma={args.sigma}, n0={args.n0}, N={args.n}, "
              f"alpha={args.alpha}, grid={radii}", flush=True)
        print(f"{'idx':>6} {'label':>5} | {'fixed pred':>10} {'radius':>7} | {'seq pred':>8} {'radius':>7} "
              f"{'grid r':>7} {'n_used':>7}", flush=True)
        for idx in indices:
            x, label = dataset[idx]
            x = torch.as_tensor(x, dtype=torch.float32).to(device)
            g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + idx)
            t0 = time.perf_counter()
            fixed = smooth.certify_full(x, args.n0, args.n, args.alpha, bs, generator=g)
            t1 = time.perf_counter()
            seq = certify_sequential(smooth, x, args.n0, args.n, args.alpha, bs, radii, n_first=args.n_first,
                                     growth=args.growth, generator=g)
            t2 = time.perf_counter()
            fixed_time += t1 - t0
            seq_time += t2 - t1
            fixed_samples += args.n0 + args.n
            seq_samples += args.n0 + seq.n_used
            if fixed.prediction == label:
                fixed_ok += fixed.radius >= grid
            if seq.prediction == label:
                seq_ok += np.asarray(seq.certified, dtype=float)
            print(f"{idx:>6} {label:>5} | {fixed.prediction:>10} {fixed.radius:>7.3f} | {seq.prediction:>8} "
                  f"{seq.radius:>7.3f} {seq.grid_radius if seq.grid_radius is not None else '-':>7} "
                  f"{seq.n_used:>7}", flush=True)
        m = len(indices)
        if m == 0:
            raise UserError("no images selected (check --skip/--max-images)")
        print("\nradius      " + " ".join(f"{r:>6.3f}" for r in radii))
        print("fixed-N     " + " ".join(f"{a:>6.3f}" for a in fixed_ok / m))
        print("sequential  " + " ".join(f"{a:>6.3f}" for a in seq_ok / m))
        print(f"\nmean samples/image: fixed {fixed_samples / m:.0f}, sequential {seq_samples / m:.0f} "
              f"({fixed_samples / max(seq_samples, 1):.2f}x fewer); wall s/image: fixed {fixed_time / m:.2f}, "
              f"sequential {seq_time / m:.2f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
