"""``smoothtransfer train-denoiser``: train a denoiser for denoised smoothing.

``--kind diffusion`` trains a DDPM UNet with the ε-prediction loss (Ho et al. 2020) for one-shot denoising
(Carlini et al. 2023); ``--kind mse`` trains a σ-conditioned DnCNN with the MSE loss (Salman et al. 2020).

Output layout (``--out DIR``): every epoch the denoiser is written with ``save_pretrained`` (plus
``train_state.pt``: optimizer state and epoch) into a temporary directory that is then renamed to
``DIR/epoch-NNNN`` (``os.replace``), after which ``DIR/latest.json`` is atomically repointed and older epoch
directories are removed. A kill at any moment leaves a complete checkpoint. ``load_denoiser(DIR)`` and
``--resume`` follow ``latest.json``. The data order of epoch e is seeded by (seed, e), so a resumed run
draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

HELP = "train a denoiser (one-shot diffusion UNet or σ-conditioned DnCNN) for denoised smoothing"

TRAIN_STATE = "train_state.pt"
DEFAULT_LR = {"diffusion": 2e-4, "mse": 1e-3}  # Ho et al. 2020; Salman et al. 2020


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["diffusion", "mse"], default="diffusion",
                   help="diffusion: DDPM UNet (ε-prediction); mse: σ-conditioned DnCNN (MSE)")
    p.add_argument("--dataset", default="cifar10", help="dataset name (cifar10, tiny-imagenet-32, ...)")
    p.add_argument("--data-root", help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA or ../shared/datasets)")
    p.add_argument("--size", default="tiny",
                   help="diffusion: tiny | small | ddpm-cifar10 (Ho et al.'s 35.7M UNet); mse: tiny | small | dncnn")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="noise levels the MSE denoiser trains for (each image draws one); unused for diffusion")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-4 diffusion, 1e-3 mse)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument("--max-train", type=int, default=None, help="train on a fixed random subset of this many images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (loadable with load_denoiser / --denoiser)")
    p.add_argument("--resume", action="store_true", help="continue from the last epoch saved in --out")
    p.add_argument("--no-progress", action="store_true")


def _check_args(args: argparse.Namespace) -> None:
    from smoothtransfer.errors import UserError
    from smoothtransfer.models.denoisers import DIFFUSION_SIZES, MSE_SIZES

    sizes = DIFFUSION_SIZES if args.kind == "diffusion" else tuple(MSE_SIZES)
    if args.size not in sizes:
        raise UserError(f"--size {args.size} is not a {args.kind} denoiser size; choose from: {', '.join(sizes)}")
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.max_train is not None and args.max_train < 1:
        raise UserError(f"--max-train must be >= 1, got {args.max_train}")
    if args.kind == "mse" and (not args.sigmas or any(not (0 <= s < math.inf) for s in args.sigmas)):
        raise UserError(f"--sigmas must be finite values >= 0, got {args.sigmas}")


def _config(args: argparse.Namespace, image_size: int, channels: int) -> dict:
    return {"kind": args.kind, "size": args.size, "dataset": args.dataset, "image_size": image_size,
            "channels": channels, "sigmas": list(args.sigmas) if args.kind == "mse" else None,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip, "max_train": args.max_train, "seed": args.seed}


def _new_denoiser(args: argparse.Namespace, image_size: int, channels: int):
    from smoothtransfer.models.denoisers import (
        DiffusionDenoiser,
        MSEDenoiser,
        create_ddpm_scheduler,
        create_diffusion_unet,
    )

    if args.kind == "diffusion":
        return DiffusionDenoiser(create_diffusion_unet(image_size, channels, args.size), create_ddpm_scheduler())
    return MSEDenoiser.create(args.size, channels=channels, image_size=image_size)


def _trainable(denoiser):
    """The module whose parameters are trained: the UNet of a diffusion denoiser, the DnCNN itself otherwise."""
    return denoiser.unet if getattr(denoiser, "kind", None) == "diffusion" else denoiser


def _save_epoch(out: Path, denoiser, optimizer, epoch: int, config: dict, history: list[dict]) -> None:
    """Atomic checkpoint: temp dir → ``os.replace`` → ``epoch-NNNN``; then repoint ``latest.json``."""
    import torch

    from smoothtransfer.models.denoisers import LATEST
    from smoothtransfer.utils import atomic_write_json

    name = f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint is an ordinary output directory
        denoiser.save_pretrained(tmp)
        torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "config": json.dumps(config)},
                   tmp / TRAIN_STATE)
        final = out / name
        if final.exists():  # a leftover of a run killed between rename and repointing: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(out / LATEST, {"path": name, "epoch": epoch, "config": config, "history": history})
    for old in out.glob("epoch-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _load_resume(out: Path, config: dict):
    """``(epoch dir, train state, history)`` of the run in ``out``, or None if there is none."""
    import torch

    from smoothtransfer.errors import UserError
    from smoothtransfer.models.denoisers import LATEST

    if not (out / LATEST).exists():
        return None
    try:
        latest = json.loads((out / LATEST).read_text())
        d = out / latest["path"]
        state = torch.load(d / TRAIN_STATE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot resume from {out}: {e}") from None
    saved = json.loads(state["config"])
    for key in ("kind", "size", "dataset", "image_size", "channels", "sigmas", "batch_size", "max_train", "seed"):
        if saved.get(key) != config.get(key):
            raise UserError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}, "
                            f"now {key}={config.get(key)!r}")
    return d, state, list(latest.get("history", []))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from smoothtransfer.data.datasets import get_dataset
    from smoothtransfer.errors import UserError
    from smoothtransfer.models.denoisers import LATEST, load_denoiser
    from smoothtransfer.objectives.denoiser import denoiser_objective
    from smoothtransfer.utils import atomic_write_json, environment_info, git_revision, resolve_device

    _check_args(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / LATEST).exists() and not args.resume:
        raise UserError(f"{out} already holds a denoiser run; pass --resume to continue it or choose another --out")

    ds = get_dataset(args.dataset, "train", root=args.data_root, min_classes=1)  # labels are not used
    images = ds.images
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise UserError(f"dataset {args.dataset} did not give uint8 (N,C,H,W) images")
    n_all, channels, h, w = images.shape
    if h != w:
        raise UserError(f"dataset {args.dataset} has non-square {h}x{w} images")
    if args.max_train is not None and args.max_train < n_all:
        g = torch.Generator().manual_seed(args.seed + 7)
        images = images[torch.randperm(n_all, generator=g)[: args.max_train].sort().values]
    n = len(images)

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.kind]
    config = {**_config(args, h, channels), "lr": lr}
    out.mkdir(parents=True, exist_ok=True)

    resumed = _load_resume(out, config) if args.resume else None
    if resumed is not None:
        ckpt_dir, state, history = resumed
        denoiser = load_denoiser(ckpt_dir, device)
        start_epoch = int(state["epoch"])
    else:
        if args.resume:
            print(f"no checkpoint in {out}; starting a new run")
        torch.manual_seed(args.seed)
        denoiser = _new_denoiser(args, h, channels).to(device)
        state, history, start_epoch = None, [], 0
    module = _trainable(denoiser)
    module.requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=args.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    objective = denoiser_objective(args.kind, args.sigmas)
    atomic_write_json(out / "run.json", {"config": config, "lr": lr, "git_rev": git_revision(),
                                         "environment": environment_info()})
    if start_epoch >= args.epochs:
        print(f"{out}: already trained for {start_epoch} epoch(s)")
        return 0

    steps = max(1, n // args.batch_size)  # drop the last partial batch (except for tiny datasets)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        module.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        torch.manual_seed(args.seed * 100_003 + epoch)  # noise and t draws: same for a resumed epoch
        total, count = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", disable=args.no_progress,
                   leave=False)
        for s in bar:
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = images[idx].to(device, non_blocking=True).float().div_(255.0)
            # Horizontal flips (Ho et al. train their CIFAR-10 DDPM with them; harmless for denoising).
            flip = torch.rand(len(x), device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss, _ = objective(denoiser, x)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        module.eval()
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), "time_s": round(time.time() - t0, 2)}
        history.append(row)
        _save_epoch(out, denoiser, optimizer, epoch + 1, config, history)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {row['loss']:.5f}  ({row['time_s']:.1f}s)  -> {out}")
    return 0
