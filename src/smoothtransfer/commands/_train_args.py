"""What ``pretrain`` and ``finetune`` share: ``--config FILE.yaml``, ``--set a.b=c``, the TrainConfig flags
(generated from its fields, :func:`smoothtransfer.commands._flags.add_train_arguments`), ``--resume`` and
``--overwrite``; flags → dotted overrides → validated TrainConfig → :func:`~smoothtransfer.train.run_training`."""

from __future__ import annotations

import argparse

from smoothtransfer.commands._flags import add_train_arguments, train_overrides
from smoothtransfer.config import TrainConfig, load_train_config


def add_common(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", help="YAML file with TrainConfig keys; flags and --set override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.lr=0.01 (repeatable)")
    add_train_arguments(p, stage)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out with other settings")


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """Flags → dotted overrides → validated TrainConfig (flags win over --config, --set wins over flags)."""
    return load_train_config(args.config, [f"stage={stage}", *train_overrides(args, stage), *args.overrides])


def run_train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from smoothtransfer.train.loop import run_training

    path = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {path}")
    return 0
