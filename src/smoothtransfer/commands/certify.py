"""``smoothtransfer certify``: CERTIFY a dataset with the smoothed classifier at one or more noise levels.

Flags → :class:`~smoothtransfer.job_configs.CertifyConfig` → :func:`smoothtransfer.smoothing.certify_run`, which
writes ``OUT/sigma_<σ>.tsv`` (Cohen et al.'s columns + ``count``, ``p_lower``), ``sigma_<σ>.json`` sidecars and
``summary.json`` (format: :mod:`smoothtransfer.smoothing.results`); then a ``(clean)certified`` table is printed.
Every argument, the checkpoint, the dataset and any existing results in ``OUT`` are checked before any work;
rerunning the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import CertifyConfig


def torchrun_shard(args):
    """The shard of this process: ``--shard K/NUM``, else ``(RANK, WORLD_SIZE)`` under torchrun, else None."""
    from smoothtransfer.smoothing.jobs import torchrun_shard as shard_of  # torch: not needed for --help

    return shard_of(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, CertifyConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.smoothing.jobs import certify_run  # torch: not needed for --help

    result = certify_run(config_from_args(CertifyConfig, args))
    print(result.table(), end="")
    print(f"results: {result.out}/ (summary.json, sigma_*.tsv); report: smoothtransfer report {result.out}")
    return 0
