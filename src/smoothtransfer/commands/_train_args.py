"""Flags shared by ``pretrain`` and ``finetune``: each maps onto one TrainConfig key (see config.py)."""

from __future__ import annotations

import argparse

import yaml

from smoothtransfer.config import TrainConfig, load_train_config
from smoothtransfer.errors import UserError


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with TrainConfig keys; flags and --set override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--dataset", help="dataset name (cifar10, tiny-imagenet-32, eurosat-32, imagefolder:PATH, ...)")
    p.add_argument("--data-root", help="folder holding the dataset zips (default: $SMOOTHTRANSFER_DATA or ../shared/datasets)")
    p.add_argument("--model", help="architecture (resnet20, resnet110, resnet50, vit_tiny_patch4_32, ...)")
    p.add_argument("--norm", choices=["batch", "group", "layer", "instance"],
                   help="normalisation layers of a CNN (default batch; ViTs: layer). group = GroupNorm with "
                        "the largest divisor of C that is <= min(32, C/4) groups: >= 4 channels per group on "
                        "narrow layers (16 channels: 4 groups), 32 groups from C = 128; layer = one group; "
                        "instance = one channel per group")
    p.add_argument("--objective", help="clean, gaussian, mixed, consistency, smoothadv, macer, adversarial, simclr, ftcadis")
    p.add_argument("--sigma", type=float, help="noise level σ of the objective (gaussian, consistency, ...)")
    p.add_argument("--sigmas", type=float, nargs="+", help="σ set S of the mixed objective, e.g. 0 0.25 0.5 1.0")
    p.add_argument("--param", dest="objective_params", action="append", default=[], metavar="KEY=VALUE",
                   help="another objective parameter, e.g. --param m=2 (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999")
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--max-train", type=int, help="train on a fixed random subset of this many images")
    p.add_argument("--val-fraction", type=float, help="fraction of the training split held out for validation")
    p.add_argument("--shots-per-class", type=int, help="k images per class (low-data fine-tuning)")
    p.add_argument("--eval-sigmas", type=float, nargs="+", help="σ for noisy validation accuracy")
    p.add_argument("--select", choices=["last", "best"], help="final checkpoint: last epoch or best on validation")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --out with other settings")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, stage: str, extra: dict | None = None) -> TrainConfig:
    """Flags → dotted overrides → validated TrainConfig (flags win over --config, --set wins over flags)."""
    flags: dict[str, object] = {
        "data.dataset": args.dataset, "data.data_root": args.data_root, "model.arch": args.model,
        "model.norm": args.norm, "objective.name": args.objective, "epochs": args.epochs,
        "batch_size": args.batch_size, "optim.lr": args.lr, "optim.name": args.optimizer,
        "optim.weight_decay": args.weight_decay, "optim.warmup_epochs": args.warmup_epochs,
        "optim.ema": args.ema, "optim.grad_clip": args.grad_clip, "data.max_train": args.max_train,
        "data.val_fraction": args.val_fraction, "data.shots_per_class": args.shots_per_class,
        "eval_sigmas": args.eval_sigmas, "select": args.select, "amp": args.amp, "device": args.device,
        "threads": args.threads, "seed": args.seed, "out": args.out,
        "objective.params.sigma": args.sigma, "objective.params.sigmas": args.sigmas,
    }
    flags.update(extra or {})
    if args.no_progress:
        flags["progress"] = False
    overrides = [f"stage={stage}"]
    overrides += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in flags.items()
                  if v is not None]
    for item in args.objective_params:
        if "=" not in item:
            raise UserError(f"--param '{item}' must look like key=value")
        overrides.append(f"objective.params.{item}")
    overrides += args.overrides
    return load_train_config(args.config, overrides)


def run_train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from smoothtransfer.train.loop import run_training

    path = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {path}")
    return 0
