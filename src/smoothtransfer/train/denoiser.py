"""Library entry point of ``smoothtransfer train-denoiser``: :func:`train_denoiser` (:class:`DenoiserConfig`).

``kind="diffusion"`` trains a DDPM UNet with the ε-prediction loss (Ho et al. 2020) for one-shot denoising
(Carlini et al. 2023); ``kind="mse"`` trains a σ-conditioned DnCNN with the MSE loss (Salman et al. 2020).

Output layout (``out``): every epoch the denoiser is written with ``save_pretrained`` (plus ``train_state.pt``:
optimizer state and epoch) into a temporary directory that is then renamed to ``out/epoch-NNNN``
(``os.replace``), after which ``out/latest.json`` is atomically repointed and older epoch directories are
removed. A kill at any moment leaves a complete checkpoint. ``load_denoiser(out)`` and ``resume=True`` follow
``latest.json``. The data order of epoch e is seeded by (seed, e), so a resumed run draws the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smoothtransfer.data import datasets
from smoothtransfer.errors import UserError
from smoothtransfer.job_configs import DenoiserConfig
from smoothtransfer.models.denoisers import (
    LATEST,
    DiffusionDenoiser,
    MSEDenoiser,
    create_ddpm_scheduler,
    create_diffusion_unet,
    load_denoiser,
)
from smoothtransfer.objectives.denoiser import denoiser_objective
from smoothtransfer.utils import atomic_write_json, environment_info, git_revision, resolve_device

__all__ = ["DEFAULT_LR", "DenoiserConfig", "train_denoiser"]

TRAIN_STATE = "train_state.pt"
DEFAULT_LR = {"diffusion": 2e-4, "mse": 1e-3}  # Ho et al. 2020; Salman et al. 2020
#: settings a resumed run must share with the run it continues
RESUME_KEYS = ("kind", "size", "dataset", "image_size", "channels", "sigmas", "batch_size", "max_train", "seed")


def _record(cfg: DenoiserConfig, image_size: int, channels: int, lr: float) -> dict:
    """The settings recorded in ``run.json``, ``latest.json`` and every ``train_state.pt``."""
    return {"kind": cfg.kind, "size": cfg.size, "dataset": cfg.dataset, "image_size": image_size,
            "channels": channels, "sigmas": list(cfg.sigmas) if cfg.kind == "mse" else None,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": lr, "weight_decay": cfg.weight_decay,
            "grad_clip": cfg.grad_clip, "max_train": cfg.max_train, "seed": cfg.seed}


def _new_denoiser(cfg: DenoiserConfig, image_size: int, channels: int):
    if cfg.kind == "diffusion":
        return DiffusionDenoiser(create_diffusion_unet(image_size, channels, cfg.size), create_ddpm_scheduler())
    return MSEDenoiser.create(cfg.size, channels=channels, image_size=image_size)


def _trainable(denoiser):
    """The module whose parameters are trained: the UNet of a diffusion denoiser, the DnCNN itself otherwise."""
    return denoiser.unet if getattr(denoiser, "kind", None) == "diffusion" else denoiser


def _save_epoch(out: Path, denoiser, optimizer, epoch: int, config: dict, history: list[dict]) -> None:
    """Atomic checkpoint: temp dir → ``os.replace`` → ``epoch-NNNN``; then repoint ``latest.json``."""
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
    if not (out / LATEST).exists():
        return None
    try:
        latest = json.loads((out / LATEST).read_text())
        d = out / latest["path"]
        state = torch.load(d / TRAIN_STATE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot resume from {out}: {e}") from None
    saved = json.loads(state["config"])
    for key in RESUME_KEYS:
        if saved.get(key) != config.get(key):
            raise UserError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}, "
                            f"now {key}={config.get(key)!r}")
    return d, state, list(latest.get("history", []))


def finished_epochs(out: str | os.PathLike) -> int:
    """Epochs of the denoiser run in ``out`` (0 when there is none)."""
    latest = Path(out) / LATEST
    return len(json.loads(latest.read_text()).get("history", [])) if latest.exists() else 0


def train_denoiser(cfg: DenoiserConfig) -> Path:
    """Train (or, with ``resume=True``, continue) the denoiser of ``cfg``; returns ``cfg.out``, loadable with
    ``load_denoiser`` or ``certify --denoiser``. Prints one line per epoch."""
    cfg = cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / LATEST).exists() and not cfg.resume:
        raise UserError(f"{out} already holds a denoiser run; pass --resume to continue it or choose another --out")

    ds = datasets.get_dataset(cfg.dataset, "train", root=cfg.data_root, min_classes=1)  # labels are not used
    images = ds.images
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise UserError(f"dataset {cfg.dataset} did not give uint8 (N,C,H,W) images")
    n_all, channels, h, w = images.shape
    if h != w:
        raise UserError(f"dataset {cfg.dataset} has non-square {h}x{w} images")
    if cfg.max_train is not None and cfg.max_train < n_all:
        g = torch.Generator().manual_seed(cfg.seed + 7)
        images = images[torch.randperm(n_all, generator=g)[: cfg.max_train].sort().values]
    n = len(images)

    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.kind]
    config = _record(cfg, h, channels, lr)
    out.mkdir(parents=True, exist_ok=True)

    resumed = _load_resume(out, config) if cfg.resume else None
    if resumed is not None:
        ckpt_dir, state, history = resumed
        denoiser = load_denoiser(ckpt_dir, device)
        start_epoch = int(state["epoch"])
    else:
        if cfg.resume:
            print(f"no checkpoint in {out}; starting a new run")
        torch.manual_seed(cfg.seed)
        denoiser = _new_denoiser(cfg, h, channels).to(device)
        state, history, start_epoch = None, [], 0
    module = _trainable(denoiser)
    module.requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    objective = denoiser_objective(cfg.kind, cfg.sigmas)
    atomic_write_json(out / "run.json", {"config": config, "lr": lr, "git_rev": git_revision(),
                                         "environment": environment_info()})
    if start_epoch >= cfg.epochs:
        print(f"{out}: already trained for {start_epoch} epoch(s)")
        return out

    steps = max(1, n // cfg.batch_size)  # drop the last partial batch (except for tiny datasets)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        module.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # noise and t draws: same for a resumed epoch
        total, count = 0.0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for s in bar:
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = images[idx].to(device, non_blocking=True).float().div_(255.0)
            # Horizontal flips (Ho et al. train their CIFAR-10 DDPM with them; harmless for denoising).
            flip = torch.rand(len(x), device=device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss, _ = objective(denoiser, x)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        module.eval()
        row = {"epoch": epoch + 1, "loss": total / max(count, 1), "time_s": round(time.time() - t0, 2)}
        history.append(row)
        _save_epoch(out, denoiser, optimizer, epoch + 1, config, history)
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['loss']:.5f}  ({row['time_s']:.1f}s)  -> {out}")
    return out
