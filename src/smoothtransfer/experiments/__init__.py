"""Experiment grids: a paper's comparisons as ``configs/experiments/NAME.yaml`` → runs → tables with verdicts.

- :mod:`.spec`: load and validate a grid (scales, runs, tables); nothing runs there;
- :mod:`.runner`: train and evaluate the runs (reusing finished runs and stored results);
- :mod:`.store`: the small result files of every run, kept apart from run directories (``results/``);
- :mod:`.tables`: paper-style tables with intervals, the paper's numbers, best-over-σ views and verdicts.
"""

from __future__ import annotations

from pathlib import Path

from smoothtransfer.experiments import spec as _spec
from smoothtransfer.experiments.runner import plan, run_denoiser, run_eval, run_experiment
from smoothtransfer.experiments.spec import (
    EVAL_KINDS,
    SCALES,
    Experiment,
    Run,
    available,
    base_accuracy_eval,
    experiments_dir,
    find_experiment,
    load_yaml,
    runs_root,
)
from smoothtransfer.experiments.tables import (
    cell,
    check_tables,
    collect,
    render_tables,
    settings_line,
    update_results_md,
    verdict_summary,
    write_report,
)


def load_experiment(name: str, scale: str = "cpu-small", out: str | Path | None = None,
                    overrides: list[str] | None = None, data_root: str | None = None,
                    device: str | None = None, only: list[str] | None = None,
                    results_dir: str | Path | None = None) -> Experiment:
    """Resolve and validate a grid (runs, datasets, table columns and claims); nothing runs here.
    See :func:`smoothtransfer.experiments.spec.load_experiment`."""
    exp = _spec.load_experiment(name, scale, out=out, overrides=overrides, data_root=data_root, device=device,
                                only=only, results_dir=results_dir)
    check_tables(exp)
    return exp


__all__ = [
    "EVAL_KINDS", "SCALES", "Experiment", "Run", "available", "base_accuracy_eval", "cell", "check_tables",
    "collect", "experiments_dir", "find_experiment", "load_experiment", "load_yaml", "plan", "render_tables",
    "run_denoiser", "run_eval", "run_experiment", "runs_root", "settings_line", "update_results_md",
    "verdict_summary", "write_report",
]
