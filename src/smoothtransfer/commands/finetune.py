"""``smoothtransfer finetune``: downstream fine-tuning from a pre-trained checkpoint with a fresh head."""

from __future__ import annotations

import argparse

from smoothtransfer.commands._train_args import add_common, config_from_args, run_train


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--init", required=True,
                   help="pre-trained checkpoint.pt to start from, or a model trained elsewhere: cohen:FILE, "
                        "hf-hub:ORG/NAME, local-dir:DIR, ... (see certify --help)")
    p.add_argument("--mode", choices=["full", "fixed", "head", "lora"],
                   help="what is trained (default full). full: every weight (backbone, norm layers, new head); "
                        "fixed: only the new last FC layer, the backbone frozen with its norm statistics "
                        "(BatchNorm stays in eval mode); head: the same as fixed (an alias, recorded as "
                        "fixed); lora: LoRA adapters + the new head, every other weight frozen")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--denoiser", help="denoiser directory (FT-CADIS: fine-tune through the denoiser)")


def run(args: argparse.Namespace) -> int:
    extra = {"init": args.init, "mode": args.mode, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
             "denoiser": args.denoiser}
    return run_train(config_from_args(args, "finetune", extra), args)
