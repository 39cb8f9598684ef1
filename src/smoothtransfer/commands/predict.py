"""``smoothtransfer predict``: Cohen et al.'s PREDICT over a dataset (abstains when the vote is not significant).

Writes ``OUT/predict_sigma_<σ>.tsv`` (``idx label predict correct time``), sidecars and
``predict_summary.json`` (accuracy and abstain rate per σ); resumable like ``certify``.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands.certify import (
    add_common_arguments,
    finish_shards,
    prepare,
    resolve_workers,
    torchrun_shard,
    validate_numbers,
)

HELP = "PREDICT a dataset with the smoothed classifier (abstains when unsure)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, n_default=100_000, batch_default=400)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.reporting.tables import markdown_table
    from smoothtransfer.smoothing.runner import predict_dataset

    validate_numbers(args, None)
    shard = torchrun_shard(args)
    ctx = prepare(args, "predict")
    summary = predict_dataset(
        ctx["model"], ctx["dataset"], sigmas=args.sigma, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
        out_dir=ctx["out"], indices=ctx["indices"], seed=args.seed, device=ctx["device"],
        num_classes=ctx["num_classes"], progress=not args.no_progress, amp_dtype=ctx["amp_dtype"],
        identity=ctx["identity"], info=ctx["info"], overwrite=args.overwrite, shard=shard,
        workers=resolve_workers(args.workers, ctx["device"], len(ctx["indices"])), pack=args.pack,
    )
    summary = finish_shards(ctx["out"], shard, "predict") or summary
    wanted = {float(s) for s in args.sigma}
    rows = [{"σ": e["sigma"], "N": e["n"], "α": e["alpha"], "images": e["num_done"],
             "accuracy %": f"{100 * e['accuracy']:.1f}", "abstain %": f"{100 * e['abstain_rate']:.1f}",
             "images/s": f"{e['images_per_s']:.3g}"}
            for e in summary["sigmas"] if e["sigma"] in wanted]
    print(markdown_table(rows, ["σ", "N", "α", "images", "accuracy %", "abstain %", "images/s"]), end="")
    print(f"results: {ctx['out']}/ (predict_summary.json, predict_sigma_*.tsv)")
    return 0
