"""``smoothtransfer noise-profile``: base-classifier accuracy under Gaussian noise at several σ.

The comparison of Table 2 of "A Study of the Effects of Transfer Learning on Adversarial Robustness" (an
adversarially trained vs a consistency-trained model). Writes ``OUT/noise_profile.json`` and prints a markdown
table. Arguments, checkpoint and dataset are checked before any work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from smoothtransfer.commands.attack import (
    add_data_arguments,
    load_inputs,
    output_path,
    run_info,
    validate_data_arguments,
)

HELP = "base-classifier accuracy under Gaussian noise at several σ"
#: = ``evaluation.noise_profile.DEFAULT_SIGMAS`` (the paper's Table 2), repeated so ``--help`` needs no torch.
DEFAULT_SIGMAS = (0.001, 0.01, 0.1, 0.25, 0.5, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p, batch_default=256)
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=list(DEFAULT_SIGMAS),
        metavar="σ",
        help=f"noise levels in [0,1] pixel units; 0 gives the clean accuracy "
        f"(default: {' '.join(f'{s:g}' for s in DEFAULT_SIGMAS)})",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from smoothtransfer.evaluation.noise_profile import check_sigmas, markdown_table, noise_profile
    from smoothtransfer.utils import atomic_write_json

    validate_data_arguments(args)
    sigmas = check_sigmas(args.sigmas)
    path = output_path(args, "noise_profile", "noise_profile.json")
    ctx = load_inputs(args)
    gen = torch.Generator(device=ctx["device"]).manual_seed(args.seed)
    t0 = time.time()
    prof = noise_profile(
        ctx["model"],
        ctx["dataset"],
        sigmas,
        batch_size=args.batch_size,
        generator=gen,
        indices=ctx["indices"],
        num_classes=ctx["num_classes"],
    )
    result = {
        "accuracy": {f"{s:g}": a for s, a in prof.items()},
        "sigmas": list(sigmas),
        "n": len(ctx["indices"]),
        "seconds": time.time() - t0,
        **run_info(args),
    }
    atomic_write_json(path, result)
    print(markdown_table(prof, Path(args.checkpoint).stem))
    print(f"(n={len(ctx['indices'])} images, accuracy in %) -> {path}")
    return 0
