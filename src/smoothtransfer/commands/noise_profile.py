"""``smoothtransfer noise-profile``: base-classifier accuracy under Gaussian noise at several σ.

The comparison of Table 2 of "A Study of the Effects of Transfer Learning on Adversarial Robustness" (an
adversarially trained vs a consistency-trained model). Flags → :class:`~smoothtransfer.job_configs.NoiseProfileConfig`
→ :func:`smoothtransfer.evaluation.run_noise_profile`, which writes ``OUT/noise_profile.json``; prints a
markdown table.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import DEFAULT_NOISE_SIGMAS, NoiseProfileConfig

DEFAULT_SIGMAS = DEFAULT_NOISE_SIGMAS


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, NoiseProfileConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.evaluation.jobs import run_noise_profile  # torch: not needed for --help

    print(run_noise_profile(config_from_args(NoiseProfileConfig, args)).line)
    return 0
