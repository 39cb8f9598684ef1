"""``smoothtransfer report DIR...``: paper-style ``(clean)certified`` markdown table + certified-accuracy plot.

Reads the ``sigma_*.tsv`` (+ sidecars) of each certify run directory (or Cohen et al.'s raw certify output
files), writes ``report.md`` and ``certified_accuracy.png`` into the first DIR (or ``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from smoothtransfer.errors import UserError

HELP = "markdown table and certified-accuracy plot from certify run directories"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="certify result directories (or result .tsv files)")
    p.add_argument("--radii", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   help="L2 radii of the table columns (default: 0.25 0.5 0.75 1.0)")
    p.add_argument("--names", nargs="+", default=None, help="run names for the table/legend (default: folder names)")
    p.add_argument("--out", default=None, help="where to write report.md and certified_accuracy.png (default: first DIR)")
    p.add_argument("--digits", type=int, default=1, help="decimals of the percentages (default: 1)")
    p.add_argument("--max-radius", type=float, default=None, help="x-axis limit of the plot (default: from the data)")
    p.add_argument("--title", default=None, help="title of the report and plot")


def _run_facts(run) -> str:
    facts = []
    for key in ("checkpoint", "dataset", "split", "denoiser", "certifier", "amp", "seed"):
        vals = {str(r.sidecar[key]) for r in run.results if r.sidecar.get(key) not in (None, "")}
        if vals:
            facts.append(f"{key}: {', '.join(sorted(vals))}")
    return "; ".join(facts) if facts else "no sidecar (raw TSV)"


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.reporting.plots import plot_certified_accuracy
    from smoothtransfer.reporting.tables import TABLE_NOTE, certified_table, load_run
    from smoothtransfer.utils import WRITE_ERRNOS, write_error, write_if_changed

    for r in args.radii:
        if not (math.isfinite(r) and r >= 0):
            raise UserError(f"--radii must be >= 0, got {r:g}")
    if args.names is not None and len(args.names) != len(args.dirs):
        raise UserError(f"--names gives {len(args.names)} names for {len(args.dirs)} result directories")
    if args.digits < 0:
        raise UserError(f"--digits must be >= 0, got {args.digits}")
    if args.max_radius is not None and not args.max_radius > 0:
        raise UserError(f"--max-radius must be > 0, got {args.max_radius:g}")
    names = args.names or [None] * len(args.dirs)
    runs = [load_run(d, name=n) for d, n in zip(args.dirs, names)]
    seen: dict[str, int] = {}
    for run_ in runs:  # two folders with the same name (a/run, b/run): tell them apart
        seen[run_.name] = seen.get(run_.name, 0) + 1
        if seen[run_.name] > 1:
            run_.name = f"{run_.name}#{seen[run_.name]}"

    first = Path(args.dirs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    table = certified_table(runs, args.radii, args.digits)
    try:  # both files are rewritten only when they change: a rerun into a read-only folder then works
        png = plot_certified_accuracy(runs, out / "certified_accuracy.png", max_radius=args.max_radius,
                                      title=args.title)
        lines = [f"# {args.title or 'Certification report'}", "", table, TABLE_NOTE, "", "Runs:", ""]
        lines += [f"- **{r.name}**: `{r.path}` ({_run_facts(r)})" for r in runs]
        lines += ["", f"![certified accuracy]({png.name})", ""]
        write_if_changed(out / "report.md", "\n".join(lines))
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, out, kept="choose a writable folder with --out") from None
    print(table, end="")
    print(f"wrote {out / 'report.md'} and {png}")
    return 0
