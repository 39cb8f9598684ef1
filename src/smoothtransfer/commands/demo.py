"""``smoothtransfer demo``: clean vs mixed-noise pre-training → the same clean fine-tune → certification.

It is the bundled experiment ``configs/experiments/demo.yaml`` run at a preset scale: ``quick`` is sized for
2 CPU cores and about 15 minutes (the two chains side by side, one process per core); ``paper`` uses the
paper's sizes (ResNet-152 LN, 100 epochs, N = 100k) for GPUs.
"""

from __future__ import annotations

import argparse
import time

from smoothtransfer.commands._flags import parse_jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", choices=["quick", "paper"],
                   help="quick: 2 CPU cores, about 15 min; paper: the paper's sizes (GPU)")
    p.add_argument("--out", default="runs/demo", help="report directory (checkpoints, TSVs, report.md, plot)")
    p.add_argument("--data-root", help="folder holding the dataset zips (default: $SMOOTHTRANSFER_DATA, "
                                       "else ../shared/datasets)")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set epochs=1 or --set certify.max=20")
    p.add_argument("--jobs", type=parse_jobs, default=0, metavar="J",
                   help="train the clean and the mixed-noise model side by side, one process per core (default "
                        "auto; 1: one after the other)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from smoothtransfer import experiments as E

    t0 = time.time()
    exp = E.load_experiment("demo", args.preset, out=args.out, overrides=args.overrides,
                            data_root=args.data_root, device=args.device)
    results = E.run_experiment(exp, progress=not args.no_progress, jobs=args.jobs)
    print()
    print(E.render_tables(exp, results))
    print(f"_{E.settings_line(exp)}_")
    print(f"report: {exp.out / 'report.md'} (plot: {exp.out / 'certified_accuracy.png'}); "
          f"finished in {(time.time() - t0) / 60:.1f} min")
    return 0
