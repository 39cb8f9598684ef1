"""``smoothtransfer experiment NAME``: a paper's grid of pretrain → finetune → certify runs, then tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from smoothtransfer.commands._flags import parse_jobs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="experiment name (see --list) or a YAML file")
    p.add_argument("--scale", default="cpu-small", help="cpu-small | cpu | gpu | paper (sizes are in the config)")
    p.add_argument("--out", help="experiment directory (default $SMOOTHTRANSFER_RUNS/experiments/NAME/SCALE, "
                   "else runs/experiments/NAME/SCALE)")
    p.add_argument("--data-root", help="folder holding the dataset zips")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run: a TrainConfig key (epochs=2, compile=false), an evaluation's "
                        "(certify.n=1000, certify.compile=false) or a denoiser run's (denoiser.epochs=4)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs (and what they start from)")
    p.add_argument("--results", help="also update this RESULTS.md section (from the run directories, else from "
                   "the results store)")
    p.add_argument("--results-dir", default="results",
                   help="results store: the small result files of every run are kept in DIR/NAME/SCALE (commit "
                   "them); a run complete there with the same settings is not run again (default: results)")
    p.add_argument("--report-only", action="store_true", help="write tables from existing run dirs; train nothing")
    p.add_argument("--jobs", type=parse_jobs, default=1, metavar="J",
                   help="run up to J independent runs side by side, one process per core group (auto: one per "
                        "core); progress bars are then off and each output line names its run (default: 1)")
    p.add_argument("--list", action="store_true", help="list the bundled experiments")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from smoothtransfer import experiments as E
    from smoothtransfer.errors import UserError

    if args.list:
        for name in E.available():
            spec = E.load_yaml(E.find_experiment(name))
            print(f"{name:28s} {spec.get('title', '')}  scales: {', '.join(spec.get('scales', {}))}")
        return 0
    if not args.name:
        raise UserError("name an experiment (smoothtransfer experiment --list shows them)")
    exp = E.load_experiment(args.name, args.scale, out=args.out, overrides=args.overrides,
                            data_root=args.data_root, device=args.device, only=args.only,
                            results_dir=args.results_dir or None)
    if args.report_only:
        results = E.collect(exp)
        E.write_report(exp, results)
    else:
        results = E.run_experiment(exp, progress=not args.no_progress, jobs=args.jobs)
    print(E.render_tables(exp, results))
    print(f"report: {exp.out / 'report.md'}")
    if args.results:
        E.update_results_md(Path(args.results), exp, results)
        print(f"updated {args.results}")
    return 0
