"""Evaluation of smoothed classifiers: certified accuracy, ACR (``metrics``), attacks, noise profiles.

The jobs behind ``smoothtransfer attack`` and ``noise-profile`` are :func:`run_attack` and
:func:`run_noise_profile` (in :mod:`.jobs`, with their configs :class:`AttackConfig` and
:class:`NoiseProfileConfig`).
"""

from smoothtransfer.evaluation.metrics import (
    abstain_rate,
    accuracy,
    acr,
    certified_accuracy,
    radius_grid,
    radius_key,
    summarize_certificates,
)
from smoothtransfer.job_configs import AttackConfig, NoiseProfileConfig

__all__ = ["AttackConfig", "NoiseProfileConfig", "abstain_rate", "accuracy", "acr", "certified_accuracy",
           "radius_grid", "radius_key", "run_attack", "run_noise_profile", "summarize_certificates"]
_JOBS = ("run_attack", "run_noise_profile")


def __getattr__(name: str):
    # The jobs load checkpoints, datasets and objectives, which themselves import this package (the attacks
    # behind adversarial training): loaded on first use rather than here, so importing the metrics stays light
    # and the package graph has no circle.
    if name in _JOBS:
        from smoothtransfer.evaluation import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
