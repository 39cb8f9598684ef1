"""``smoothtransfer pretrain``: upstream training (e.g. mixed-noise on tiny-imagenet-32, or SimCLR)."""

from __future__ import annotations

import argparse

from smoothtransfer.commands._train_args import add_common, config_from_args, run_train


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "pretrain")


def run(args: argparse.Namespace) -> int:
    return run_train(config_from_args(args, "pretrain"), args)
