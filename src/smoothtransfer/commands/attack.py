"""``smoothtransfer attack``: empirical L2 robustness of a checkpoint.

* ``--attack apgd-l2`` (default) / ``pgd-l2``: standard and robust accuracy of the base classifier under
  AutoPGD-L2 (Croce & Hein, 2020) / PGD-L2 (Madry et al., 2018) at radius ``--eps`` — the empirical robustness
  of "A Study of the Effects of Transfer Learning on Adversarial Robustness" (AutoPGD-L2, eps = 0.5).
* ``--attack smoothed-pgd``: the smoothed classifier at ``--sigma`` under the SmoothAdv attack (Salman et al.,
  2019); accuracies use Cohen et al.'s PREDICT with ``--n``/``--alpha`` (abstentions count as wrong).
* ``--attack certificate-check``: CERTIFY each image, attack it at 0.9 x its certified radius and PREDICT
  again; a different non-abstaining prediction is a violation of the certificate (exit status 1).

Writes ``OUT/attack.json`` and prints one line. Every argument, the checkpoint and the dataset are checked
before any work; an existing ``OUT/attack.json`` is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from smoothtransfer.errors import UserError

HELP = "empirical robustness: AutoPGD-L2 / PGD-L2 / attacks on the smoothed classifier"
ATTACK_CHOICES = ("apgd-l2", "pgd-l2", "smoothed-pgd", "certificate-check")
SMOOTHED = ("smoothed-pgd", "certificate-check")
DEFAULT_STEPS = {"apgd-l2": 100, "pgd-l2": 20, "smoothed-pgd": 20, "certificate-check": 20}


# ------------------------------------------------------------------------ shared with noise_profile


def add_data_arguments(p: argparse.ArgumentParser, *, batch_default: int) -> None:
    """Checkpoint, dataset and image-selection flags shared by ``attack`` and ``noise-profile``."""
    p.add_argument(
        "--checkpoint", required=True,
        help="classifier checkpoint (.pt) saved by pretrain/finetune, or cohen:FILE, macer:FILE, hf-hub:ORG/NAME, "
             "local-dir:DIR, ... (models trained elsewhere; see certify --help)"
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="cifar10, tiny-imagenet-32, eurosat-32, imagefolder:<dir or .zip>, torchvision-cifar10, ...",
    )
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument(
        "--data-root", default=None, help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA)"
    )
    p.add_argument("--skip", type=int, default=1, help="use every SKIP-th image (default: 1)")
    p.add_argument("--max", type=int, default=-1, help="at most MAX images after --skip (default: -1 = all)")
    p.add_argument(
        "--batch-size", type=int, default=batch_default, help=f"batch size (default: {batch_default})"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random starts and noise (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--out", default=None, help="result directory (default: runs/<command>/<checkpoint>-<dataset>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing result file in --out")


def validate_data_arguments(args: argparse.Namespace) -> None:
    if args.skip < 1:
        raise UserError(f"--skip must be >= 1, got {args.skip}")
    if args.max < -1 or args.max == 0:
        raise UserError(f"--max must be >= 1, or -1 for all images, got {args.max}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")


def output_path(args: argparse.Namespace, command: str, filename: str) -> Path:
    """``OUT/filename``; UserError if it exists without ``--overwrite`` (checked before any work)."""
    if args.out:
        out = Path(args.out)
    else:
        from smoothtransfer.models.external import parse_source

        src = parse_source(args.checkpoint)  # cohen:FILE, hf-hub:ORG/NAME, ...: named after format and file
        ck = Path(src.run_name if src else args.checkpoint)
        stem = (
            ck.stem
            if ck.stem not in ("checkpoint", "best", "last", "model", "final")
            else f"{ck.resolve().parent.name}-{ck.stem}"
        )
        out = Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{args.dataset}-{args.split}")
    path = out / filename
    if path.exists() and not args.overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    return path


def _check_head_trained(ckpt: dict, path: str) -> None:
    """UserError for a checkpoint whose training objective ignored labels (SimCLR): its head is untrained."""
    train = (ckpt.get("config") or {}).get("train") or {}
    objective = train.get("objective") if isinstance(train, dict) else None
    name = objective.get("name") if isinstance(objective, dict) else None
    if not name:
        return
    import smoothtransfer.objectives  # noqa: F401  (importing the package registers every objective)
    from smoothtransfer.objectives.base import OBJECTIVES

    if name in OBJECTIVES and not getattr(OBJECTIVES.get(name), "uses_labels", True):
        raise UserError(
            f"{path} was trained with the self-supervised objective '{name}', so it has no trained "
            f"classifier head; fine-tune it first (smoothtransfer finetune --init CHECKPOINT)"
        )


def load_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Load and cross-check checkpoint and dataset: ``model, dataset, indices, device, num_classes, spec``."""
    from smoothtransfer.data.datasets import get_dataset
    from smoothtransfer.data.subsets import evenly_spaced
    from smoothtransfer.evaluation.attacks import check_classifier
    from smoothtransfer.models.checkpoint import load_classifier
    from smoothtransfer.models.external import parse_source
    from smoothtransfer.utils import resolve_device

    device = resolve_device(args.device)
    if parse_source(args.checkpoint) is None and not Path(args.checkpoint).exists():  # cohen:FILE, hf-hub:...
        raise UserError(f"checkpoint {args.checkpoint} does not exist")
    model, ckpt = load_classifier(args.checkpoint, device=device)
    _check_head_trained(ckpt, args.checkpoint)
    dataset = get_dataset(args.dataset, args.split, root=args.data_root)
    classes = list(dataset.classes)
    k = check_classifier(model, len(classes))
    ck_classes = ckpt.get("classes")
    if ck_classes and list(ck_classes) != classes:
        i = next(i for i, (a, b) in enumerate(zip(ck_classes, classes)) if a != b)
        raise UserError(
            f"checkpoint classes differ from dataset {args.dataset}'s: class {i} is "
            f"'{ck_classes[i]}' in the checkpoint but '{classes[i]}' in the dataset"
        )
    spec = dict(getattr(model, "spec", None) or {})
    shape = tuple(dataset.images.shape[1:]) if hasattr(dataset, "images") else tuple(dataset[0][0].shape)
    want = (
        int(spec.get("in_chans", shape[0])),
        int(spec.get("input_size", shape[1])),
        int(spec.get("input_size", shape[2])),
    )
    if shape != want and not (spec.get("resizes_input") and shape[0] == want[0]):  # timm: resizes any size
        raise UserError(
            f"dataset {args.dataset} has {'x'.join(map(str, shape))} images but the checkpoint's "
            f"model takes {'x'.join(map(str, want))}"
        )
    indices = evenly_spaced(len(dataset), args.skip, args.max)
    if not indices:
        raise UserError(
            f"--skip {args.skip} --max {args.max} select no images of {args.dataset} ({args.split})"
        )
    return {
        "model": model,
        "dataset": dataset,
        "indices": indices,
        "device": device,
        "num_classes": k if k is not None else len(classes),
        "spec": spec,
    }


def run_info(args: argparse.Namespace) -> dict[str, Any]:
    from smoothtransfer.utils import environment_info, git_revision

    return {
        "checkpoint": args.checkpoint if ":" in args.checkpoint and not Path(args.checkpoint).exists()
        else str(Path(args.checkpoint).resolve()),
        "dataset": args.dataset,
        "split": args.split,
        "skip": args.skip,
        "max": args.max,
        "seed": args.seed,
        "git_rev": git_revision(),
        "command_line": " ".join(["smoothtransfer", *sys.argv[1:]]),
        "environment": environment_info(),
    }


# ------------------------------------------------------------------------------------------- attack


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, batch_default=100)
    p.add_argument("--attack", choices=ATTACK_CHOICES, default="apgd-l2", help="attack (default: apgd-l2)")
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L2 radius in [0,1] pixel units (default: 0.5; certificate-check uses 0.9 x each radius)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="attack steps (default: 100 for apgd-l2, 20 otherwise)"
    )
    p.add_argument("--restarts", type=int, default=1, help="apgd-l2 random restarts (default: 1)")
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="pgd step size (default: 2.5 eps/steps; smoothed: 2 eps/steps)",
    )
    g = p.add_argument_group("smoothed classifier (smoothed-pgd, certificate-check)")
    g.add_argument("--sigma", type=float, default=None, help="smoothing noise level σ (required for these)")
    g.add_argument("--m", type=int, default=16, help="noise samples per attack step (default: 16)")
    g.add_argument("--n0", type=int, default=100, help="certificate-check: selection samples (default: 100)")
    g.add_argument(
        "--n",
        type=int,
        default=None,
        help="samples of PREDICT/CERTIFY (default: 1000 for smoothed-pgd, 10000 for the check)",
    )
    g.add_argument("--alpha", type=float, default=0.001, help="failure probability (default: 0.001)")
    g.add_argument(
        "--eps-fraction",
        type=float,
        default=0.9,
        help="certificate-check: attack radius as a fraction of the certified radius (default: 0.9)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate(args: argparse.Namespace) -> None:
    """Every numeric argument, before anything is loaded; fills in the per-attack defaults."""
    validate_data_arguments(args)
    smoothed = args.attack in SMOOTHED
    if args.attack == "certificate-check":
        if args.eps is not None:
            raise UserError(
                "--eps does not apply to certificate-check (it attacks at --eps-fraction x radius)"
            )
        if not 0 < args.eps_fraction < 1:
            raise UserError(f"--eps-fraction must lie strictly between 0 and 1, got {args.eps_fraction:g}")
    else:
        args.eps = 0.5 if args.eps is None else args.eps
        if not (math.isfinite(args.eps) and args.eps > 0):
            raise UserError(f"--eps must be > 0, got {args.eps:g}")
    args.steps = DEFAULT_STEPS[args.attack] if args.steps is None else args.steps
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.restarts < 1:
        raise UserError(f"--restarts must be >= 1, got {args.restarts}")
    if args.step_size is not None and not (math.isfinite(args.step_size) and args.step_size > 0):
        raise UserError(f"--step-size must be > 0, got {args.step_size:g}")
    if smoothed:
        if args.sigma is None:
            raise UserError(f"--attack {args.attack} needs --sigma (the smoothing noise level)")
        if not (math.isfinite(args.sigma) and args.sigma > 0):
            raise UserError(f"--sigma must be > 0, got {args.sigma:g}")
        args.n = (1000 if args.attack == "smoothed-pgd" else 10_000) if args.n is None else args.n
        if args.n < 1 or args.n0 < 1:
            raise UserError(f"--n and --n0 must be >= 1, got {args.n} and {args.n0}")
        if args.m < 1:
            raise UserError(f"--m must be >= 1, got {args.m}")
        if not 0 < args.alpha < 1:
            raise UserError(f"--alpha must lie strictly between 0 and 1, got {args.alpha:g}")
    elif args.sigma is not None:
        raise UserError(f"--sigma only applies to smoothed-pgd and certificate-check, not {args.attack}")


def run(args: argparse.Namespace) -> int:
    import torch

    from smoothtransfer.evaluation.attacks import certificate_check, robust_accuracy
    from smoothtransfer.utils import atomic_write_json

    validate(args)
    path = output_path(args, "attack", "attack.json")
    ctx = load_inputs(args)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    settings: dict[str, Any] = {"attack": args.attack, "steps": args.steps}
    if args.attack in SMOOTHED:
        settings.update(sigma=args.sigma, m=args.m, n=args.n, alpha=args.alpha)
    t0 = time.time()
    if args.attack == "certificate-check":
        gen = torch.Generator(device=ctx["device"]).manual_seed(args.seed)
        res = certificate_check(
            ctx["model"],
            ctx["dataset"],
            args.sigma,
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            batch_size=args.batch_size,
            indices=ctx["indices"],
            steps=args.steps,
            m=args.m,
            generator=gen,
            eps_fraction=args.eps_fraction,
            num_classes=ctx["num_classes"],
            progress=progress,
        )
        res.pop("seconds", None)
        rows = res.pop("rows")
        result = {
            **settings,
            "n0": args.n0,
            "eps_fraction": args.eps_fraction,
            **res,
            "seconds": time.time() - t0,
            **run_info(args),
            "rows": rows,
        }
        atomic_write_json(path, result)
        loud = "VIOLATIONS: " if res["violations"] else ""
        print(
            f"certificate-check σ={args.sigma:g}: {loud}{res['violations']} violation(s) among "
            f"{res['checked']} attacked certificates ({res['certified']}/{res['images']} images certified, "
            f"{res['abstained']} abstained after the attack; N={args.n}, α={args.alpha:g}, "
            f"{result['seconds']:.1f} s) -> {path}"
        )
        return 1 if res["violations"] else 0
    res = robust_accuracy(
        ctx["model"],
        ctx["dataset"],
        args.attack,
        args.eps,
        args.steps,
        batch_size=args.batch_size,
        indices=ctx["indices"],
        n_restarts=args.restarts,
        step_size=args.step_size,
        seed=args.seed,
        sigma=args.sigma,
        m=args.m,
        n=args.n or 1000,
        alpha=args.alpha,
        num_classes=ctx["num_classes"],
        progress=progress,
    )
    seconds = time.time() - t0
    result = {
        **settings,
        "eps": args.eps,
        "restarts": args.restarts,
        "step_size": args.step_size,
        **res,
        "seconds": seconds,
        **run_info(args),
    }
    atomic_write_json(path, result)
    what = f"smoothed σ={args.sigma:g} " if args.attack == "smoothed-pgd" else ""
    print(
        f"{args.attack} {what}eps={args.eps:g}: standard {100 * res['standard_acc']:.1f}%, robust "
        f"{100 * res['robust_acc']:.1f}% (n={res['n']}, {args.steps} steps, {seconds:.1f} s) -> {path}"
    )
    return 0
