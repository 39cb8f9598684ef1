"""``smoothtransfer finetune``: downstream fine-tuning from a pre-trained checkpoint with a fresh head.

Its flags are pretrain's plus the TrainConfig fields only a fine-tune has (``--init``, ``--mode``,
``--lora-rank``, ``--lora-alpha``, ``--denoiser``: ``stages=("finetune",)`` in ``config.py``)."""

from __future__ import annotations

import argparse

from smoothtransfer.commands._train_args import add_common, config_from_args, run_train


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "finetune")


def run(args: argparse.Namespace) -> int:
    return run_train(config_from_args(args, "finetune"), args)
