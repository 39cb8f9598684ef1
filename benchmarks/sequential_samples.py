"""Samples saved by sequential certification: ``certify_sequential`` vs fixed-N CERTIFY on the *same* samples.

For each image the script draws, under the image's seed, the ``n0`` selection samples and then all ``N``
estimation samples of fixed-N CERTIFY (``Smooth.certify_full``), and records every estimation vote
(``smoothing.sampling.sample_votes``: the very noise stream ``certify_full`` uses). Then, from the recorded
votes:

- fixed-N CERTIFY: ``k`` = votes for ``c_A`` among all ``N`` -> Clopper-Pearson at ``alpha`` -> radius;
- sequential: ``smoothing.sequential.sequential_decide`` — the code ``certify_sequential`` runs — replayed on
  the prefix of the same stream (under one seed, stage ``s`` of ``certify_sequential`` sees exactly the first
  ``n_s`` of those samples; ``--check-live K`` re-runs both procedures live on K images and asserts it).

Common random numbers make the comparison sharp: the two curves differ only where the procedures decide
differently on the same data, not by sampling noise. Certified accuracy at grid radius r counts ``correct and
radius >= r`` (fixed-N) and ``correct and certified[r]`` (sequential). Both are valid at level alpha.

Votes are cached per image in ``--votes DIR`` (``<idx>.npz``), so an interrupted run resumes and other stopping
rules can be replayed later without the model (``--sweep``). Images are certified by forked single-threaded
worker processes (``--workers``, default one per core), as ``smoothtransfer certify`` does on CPUs.

Usage::

    python benchmarks/sequential_samples.py --checkpoint runs/bench-r20-g025/checkpoint.pt --sigma 0.25 \\
        --n 100000 --max-images 100 --votes runs/seqbench-votes --out runs/seqbench.json
    # smoke test (random weights, tiny N):
    python benchmarks/sequential_samples.py --arch resnet20 --dataset cifar10 --n 2000 --max-images 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import (
    Smooth,
    certify_sequential,
    clopper_pearson_lower,
    compile_for_inference,
    default_batch_size,
    max_certifiable_radius,
    prepare_for_inference,
)
from smoothtransfer.smoothing.runner import image_seed
from smoothtransfer.smoothing.sampling import sample_counts, sample_votes
from smoothtransfer.smoothing.sequential import plan_stages, sequential_decide
from smoothtransfer.smoothing.stats import certified_radius
from smoothtransfer.utils import resolve_device

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # the radii of the papers' tables and of `smoothtransfer report`


def _load_model(args: argparse.Namespace, device: torch.device):
    """``(model, num_classes, dataset name or None)`` from --checkpoint, or a random --arch model."""
    if args.checkpoint:
        from smoothtransfer.models.checkpoint import load_classifier

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


# ------------------------------------------------------------------------------------------ recording
_W: dict = {}  # what forked workers need (set before the pool forks)


def _worker_init(compile_model: bool) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if compile_model:
        _W["model"] = compile_for_inference(_W["model"])


def record_votes(idx: int) -> dict:
    """Selection + all N estimation votes of one image, as fixed-N CERTIFY would draw them."""
    a, model, dataset, device = _W["args"], _W["model"], _W["dataset"], _W["device"]
    path = Path(a.votes) / f"{idx}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    x, label = dataset[idx]
    x = torch.as_tensor(x, dtype=torch.float32).to(device)
    g = torch.Generator(device=device).manual_seed(image_seed(a.seed, a.sigma, idx))
    t0 = time.perf_counter()
    c_a = int(sample_counts(model, x, a.sigma, a.n0, _W["bs"], _W["num_classes"], generator=g).argmax())
    votes = sample_votes(model, x, a.sigma, a.n, _W["bs"], _W["num_classes"], generator=g) == c_a
    rec = {"idx": np.int64(idx), "label": np.int64(label), "c_a": np.int64(c_a),
           "hits": np.packbits(votes.cpu().numpy()), "n": np.int64(a.n), "n0": np.int64(a.n0),
           "sigma": np.float64(a.sigma), "seconds": np.float64(time.perf_counter() - t0)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **rec)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a record
    return rec


# ------------------------------------------------------------------------------------------ replay
def replay(rec: dict, grid: list[float], alpha: float, **rule) -> tuple[dict, dict]:
    """(fixed-N result, sequential result) for one recorded image; ``rule`` = certify_sequential's options."""
    sigma, n, n0 = float(rec["sigma"]), int(rec["n"]), int(rec["n0"])
    hits = np.unpackbits(rec["hits"], count=n).astype(np.int64)
    prefix = np.concatenate([[0], np.cumsum(hits)])
    correct = int(rec["c_a"]) == int(rec["label"])
    k = int(prefix[-1])
    p_lower = float(clopper_pearson_lower(k, n, alpha))
    radius = float(certified_radius(sigma, p_lower)) if p_lower >= 0.5 else -1.0
    fixed = {"certified": [correct and radius >= r for r in grid], "samples": n0 + n}

    thresholds = [0.5 * math.erfc(-r / sigma / math.sqrt(2)) for r in grid]
    plan_kw = {k_: rule[k_] for k_ in ("n_first", "growth", "final_share") if k_ in rule}
    decide_kw = {k_: rule[k_] for k_ in ("futility", "futility_level") if k_ in rule}
    plan = plan_stages(n, alpha, thresholds, **plan_kw)
    used = [0]

    def draw(m: int) -> int:
        used[0] += m
        return int(prefix[used[0]] - prefix[used[0] - m])

    d = sequential_decide(draw, plan, thresholds, **decide_kw)
    seq = {"certified": [correct and d.p_lower >= 0.5 and j <= d.certified_upto for j in range(len(grid))],
           "samples": n0 + d.n_used, "n_used": d.n_used, "count": d.count, "p_lower": d.p_lower,
           "certified_upto": d.certified_upto}
    return fixed, seq


def summarize(recs: list[dict], grid: list[float], alpha: float, **rule) -> dict:
    fixed_acc = np.zeros(len(grid))
    seq_acc = np.zeros(len(grid))
    fixed_samples = seq_samples = 0
    full = 0
    for rec in recs:
        f, s = replay(rec, grid, alpha, **rule)
        fixed_acc += f["certified"]
        seq_acc += s["certified"]
        fixed_samples += f["samples"]
        seq_samples += s["samples"]
        full += s["n_used"] == int(rec["n"])
    m = len(recs)
    diff = 100 * (seq_acc - fixed_acc) / m
    return {"images": m, "grid": grid, "fixed_certified_accuracy": list(100 * fixed_acc / m),
            "sequential_certified_accuracy": list(100 * seq_acc / m), "difference_pp": list(diff),
            "max_abs_difference_pp": float(np.abs(diff).max()),
            "fixed_mean_samples": fixed_samples / m, "sequential_mean_samples": seq_samples / m,
            "samples_ratio": fixed_samples / max(seq_samples, 1), "images_drawing_all_N": full, "rule": rule}


def _print_summary(title: str, s: dict) -> None:
    print(f"\n{title}")
    print("radius              " + " ".join(f"{r:>6g}" for r in s["grid"]))
    print("fixed-N   cert. %   " + " ".join(f"{a:>6.1f}" for a in s["fixed_certified_accuracy"]))
    print("sequential cert. %  " + " ".join(f"{a:>6.1f}" for a in s["sequential_certified_accuracy"]))
    print("difference (pp)     " + " ".join(f"{a:>+6.1f}" for a in s["difference_pp"]))
    print(f"mean samples/image: fixed-N {s['fixed_mean_samples']:.0f}, sequential "
          f"{s['sequential_mean_samples']:.0f} -> {s['samples_ratio']:.1f}x fewer; "
          f"{s['images_drawing_all_N']} of {s['images']} images drew all N; "
          f"max |difference| {s['max_abs_difference_pp']:.1f} pp (one image = {100 / s['images']:.2f} pp)")


def check_live(recs: list[dict], k: int, grid: list[float], args: argparse.Namespace) -> None:
    """Re-run certify_full and certify_sequential live under each image's seed; they must equal the replay."""
    model, dataset, device = _W["model"], _W["dataset"], _W["device"]
    smooth = Smooth(model, _W["num_classes"], args.sigma, fast=False)  # the recorded votes are float32
    for rec in recs[:k]:
        idx = int(rec["idx"])
        x = torch.as_tensor(dataset[idx][0], dtype=torch.float32).to(device)
        seed = image_seed(args.seed, args.sigma, idx)
        fixed = smooth.certify_full(x, args.n0, args.n, args.alpha, _W["bs"],
                                    generator=torch.Generator(device=device).manual_seed(seed))
        seq = certify_sequential(smooth, x, args.n0, args.n, args.alpha, _W["bs"], grid,
                                 generator=torch.Generator(device=device).manual_seed(seed))
        f, s = replay(rec, grid, args.alpha)
        hits_n = int(np.unpackbits(rec["hits"], count=int(rec["n"])).sum())
        ok = (fixed.count == hits_n and seq.n_used == s["n_used"] and seq.count == s["count"]
              and seq.p_lower == s["p_lower"])
        print(f"live check image {idx}: fixed count {fixed.count} vs recorded {hits_n}; sequential n_used "
              f"{seq.n_used} vs replay {s['n_used']}: {'OK' if ok else 'MISMATCH'}", flush=True)
        if not ok:
            raise SystemExit("live certification differs from the replay: a bug")


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
    p.add_argument("--radii", default=None, help="comma-separated grid (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--batch-size", type=int, default=None, help="default: smoothing.default_batch_size")
    p.add_argument("--skip", type=int, default=None, help="every SKIP-th test image (default: spread over the split)")
    p.add_argument("--max-images", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None, help="CPU worker processes (default: one per core)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each worker")
    p.add_argument("--votes", default=None, help="cache directory of recorded votes (default: a temp dir)")
    p.add_argument("--check-live", type=int, default=0, metavar="K",
                   help="re-run both procedures live on K images and assert they equal the replay")
    p.add_argument("--sweep", action="store_true", help="also replay other stopping rules (futility, schedule)")
    p.add_argument("--out", default=None, help="write the summary JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, num_classes, ckpt_dataset = _load_model(args, device)
        prepare_for_inference(model)
        ds_name = args.dataset or ckpt_dataset
        if not ds_name:
            raise UserError("the checkpoint names no dataset: pass --dataset")
        from smoothtransfer.data.datasets import get_dataset
        from smoothtransfer.data.subsets import evenly_spaced

        dataset = get_dataset(ds_name, args.split, root=args.data_root)
        grid = [float(r) for r in args.radii.split(",")] if args.radii else list(DEFAULT_GRID)
        skip = args.skip or max(1, len(dataset) // max(1, args.max_images))
        indices = evenly_spaced(len(dataset), skip, args.max_images)
        if not indices:
            raise UserError("no images selected (check --skip/--max-images)")
        if args.votes is None:
            import tempfile

            args.votes = tempfile.mkdtemp(prefix="seqvotes-")
        Path(args.votes).mkdir(parents=True, exist_ok=True)
        bs = args.batch_size or default_batch_size(device, int(dataset[0][0].shape[-1]))
        _W.update(args=args, model=model, dataset=dataset, device=device, bs=bs, num_classes=num_classes)
        cap = max_certifiable_radius(args.sigma, args.n, args.alpha)
        print(f"{ds_name}/{args.split}: {len(indices)} images (every {skip}th), sigma={args.sigma}, n0={args.n0}, "
              f"N={args.n}, alpha={args.alpha}, grid={grid} (N caps the radius at {cap:.3f}); votes in "
              f"{args.votes}", flush=True)

        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        workers = 1 if device.type != "cpu" else (args.workers or cores)
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        recs = []
        with tqdm(total=len(indices), desc="record votes", unit="img") as bar:
            if workers > 1:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_worker_init, initargs=(args.compile,)) as pool:
                    for rec in pool.map(record_votes, indices):
                        recs.append(rec)
                        bar.update(1)
            else:
                if args.compile:
                    _W["model"] = compile_for_inference(model)
                for idx in indices:
                    recs.append(record_votes(idx))
                    bar.update(1)
        wall = time.perf_counter() - t0
        secs = float(np.mean([float(r["seconds"]) for r in recs]))
        print(f"recorded in {wall:.0f} s wall; {secs:.1f} s per image per process for n0+N = {args.n0 + args.n} "
              f"samples ({(args.n0 + args.n) / secs:.0f} samples/s per process, {workers} process(es))", flush=True)
        if args.check_live:
            check_live(recs, args.check_live, grid, args)

        main_summary = summarize(recs, grid, args.alpha)
        _print_summary("sequential (library defaults) vs fixed-N CERTIFY on the same samples:", main_summary)
        results = {"dataset": ds_name, "split": args.split, "checkpoint": args.checkpoint, "sigma": args.sigma,
                   "n0": args.n0, "n": args.n, "alpha": args.alpha, "indices": indices, "seconds_per_image": secs,
                   "defaults": main_summary, "sweep": []}
        if args.sweep:
            for rule in (dict(futility=0.0), dict(futility=0.001, futility_level=0.001),
                         dict(futility=0.05, futility_level=0.05), dict(growth=1.5), dict(growth=4.0),
                         dict(final_share=0.25), dict(final_share=0.75)):
                s = summarize(recs, grid, args.alpha, **rule)
                results["sweep"].append(s)
                _print_summary(f"rule {rule}:", s)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
