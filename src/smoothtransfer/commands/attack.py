"""``smoothtransfer attack``: empirical L2 robustness of a checkpoint.

* ``--attack apgd-l2`` (default) / ``pgd-l2``: standard and robust accuracy of the base classifier under
  AutoPGD-L2 (Croce & Hein, 2020) / PGD-L2 (Madry et al., 2018) at radius ``--eps`` — the empirical robustness
  of "A Study of the Effects of Transfer Learning on Adversarial Robustness" (AutoPGD-L2, eps = 0.5).
* ``--attack smoothed-pgd``: the smoothed classifier at ``--sigma`` under the SmoothAdv attack (Salman et al.,
  2019); accuracies use Cohen et al.'s PREDICT with ``--n``/``--alpha`` (abstentions count as wrong).
* ``--attack certificate-check``: CERTIFY each image, attack it at 0.9 x its certified radius and PREDICT
  again; a different non-abstaining prediction is a violation of the certificate (exit status 1).

Flags → :class:`~smoothtransfer.job_configs.AttackConfig` → :func:`smoothtransfer.evaluation.run_attack`, which
writes ``OUT/attack.json`` (an existing one is only replaced with ``--overwrite``); prints one line.
"""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_config_arguments, config_from_args
from smoothtransfer.job_configs import AttackConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, AttackConfig)


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.evaluation.jobs import run_attack  # torch: not needed for --help

    result = run_attack(config_from_args(AttackConfig, args))
    print(result.line)
    return 1 if result.violations else 0
