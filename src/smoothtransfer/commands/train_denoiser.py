"""``smoothtransfer train-denoiser``: train a denoiser for denoised smoothing.

Flags → :class:`~smoothtransfer.job_configs.DenoiserConfig` → :func:`smoothtransfer.train.denoiser.train_denoiser`
(one-shot diffusion UNet or σ-conditioned DnCNN; atomic per-epoch checkpoints, ``--resume``).
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import DenoiserConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, DenoiserConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.train.denoiser import train_denoiser  # torch: not needed for --help

    train_denoiser(config_from_args(DenoiserConfig, args))
    return 0
