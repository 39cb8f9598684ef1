"""Library entry point of ``smoothtransfer report``: :func:`report` (:class:`ReportConfig`).

Reads the ``sigma_*.tsv`` (+ sidecars) of each certify result directory (or Cohen et al.'s raw certify output
files), writes ``report.md`` and ``certified_accuracy.png`` into the first directory (or ``out``) and returns
the paper-style ``(clean)certified`` table. Both files are rewritten only when they change, so a rerun into a
read-only folder works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smoothtransfer.job_configs import ReportConfig
from smoothtransfer.reporting.plots import plot_certified_accuracy
from smoothtransfer.reporting.tables import TABLE_NOTE, certified_table
from smoothtransfer.smoothing.results import Run, load_run
from smoothtransfer.utils import WRITE_ERRNOS, write_error, write_if_changed

__all__ = ["Report", "ReportConfig", "report"]


@dataclass(frozen=True)
class Report:
    """What :func:`report` wrote: ``markdown`` (report.md), ``plot`` (the PNG), ``table`` and the runs read."""

    markdown: Path
    plot: Path
    table: str
    runs: list[Run]


def _run_facts(run: Run) -> str:
    facts = []
    for key in ("checkpoint", "dataset", "split", "denoiser", "certifier", "amp", "seed"):
        vals = {str(r.sidecar[key]) for r in run.results if r.sidecar.get(key) not in (None, "")}
        if vals:
            facts.append(f"{key}: {', '.join(sorted(vals))}")
    return "; ".join(facts) if facts else "no sidecar (raw TSV)"


def report(cfg: ReportConfig) -> Report:
    """The ``(clean)certified`` table at ``cfg.radii`` and the certified-accuracy curves of ``cfg.dirs``."""
    cfg = cfg.validate()
    names = cfg.names or [None] * len(cfg.dirs)
    runs = [load_run(d, name=n) for d, n in zip(cfg.dirs, names)]
    seen: dict[str, int] = {}
    for run_ in runs:  # two folders with the same name (a/run, b/run): tell them apart
        seen[run_.name] = seen.get(run_.name, 0) + 1
        if seen[run_.name] > 1:
            run_.name = f"{run_.name}#{seen[run_.name]}"

    first = Path(cfg.dirs[0])
    out = Path(cfg.out) if cfg.out else (first if first.is_dir() else first.parent)
    table = certified_table(runs, cfg.radii, cfg.digits)
    try:  # both files are rewritten only when they change: a rerun into a read-only folder then works
        png = plot_certified_accuracy(runs, out / "certified_accuracy.png", max_radius=cfg.max_radius,
                                      title=cfg.title)
        lines = [f"# {cfg.title or 'Certification report'}", "", table, TABLE_NOTE, "", "Runs:", ""]
        lines += [f"- **{r.name}**: `{r.path}` ({_run_facts(r)})" for r in runs]
        lines += ["", f"![certified accuracy]({png.name})", ""]
        write_if_changed(out / "report.md", "\n".join(lines))
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(e, out, kept="choose a writable folder with --out") from None
    return Report(markdown=out / "report.md", plot=png, table=table, runs=runs)
