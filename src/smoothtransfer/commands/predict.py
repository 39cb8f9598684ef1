"""``smoothtransfer predict``: Cohen et al.'s PREDICT over a dataset (abstains when the vote is not significant).

Flags → :class:`~smoothtransfer.job_configs.PredictConfig` → :func:`smoothtransfer.smoothing.predict_run`, which
writes ``OUT/predict_sigma_<σ>.tsv`` (``idx label predict correct time``), sidecars and ``predict_summary.json``
(accuracy and abstain rate per σ); resumable like ``certify``.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import PredictConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PredictConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.smoothing.jobs import predict_run  # torch: not needed for --help

    result = predict_run(config_from_args(PredictConfig, args))
    print(result.table(), end="")
    print(f"results: {result.out}/ (predict_summary.json, predict_sigma_*.tsv)")
    return 0
