"""Library entry point of ``smoothtransfer train-denoiser``: :func:`train_denoiser` (:class:`DenoiserConfig`).

``kind="diffusion"`` trains a DDPM UNet with the ε-prediction loss (Ho et al. 2020) for one-shot denoising
(Carlini et al. 2023); ``kind="mse"`` trains a σ-conditioned DnCNN with the MSE loss (Salman et al. 2020).
The losses are :mod:`smoothtransfer.objectives.denoiser`; the loop is the training engine
(:mod:`smoothtransfer.train.engine`), the same as for classifiers.

Output layout (``out``):

* ``checkpoint.pt`` — the engine's one resume format (weights, AdamW state, RNG state, epoch, step, history),
  written atomically after every epoch; ``resume=True`` continues from it bit for bit (also with more
  ``epochs`` than a finished run had). Its ``model_spec`` is :func:`~smoothtransfer.models.denoisers.denoiser_spec`.
* the export, written with ``save_pretrained`` when the run finishes: ``denoiser.json`` + ``unet/`` +
  ``scheduler/`` (diffusers' own format) or ``model.safetensors``.
* ``run.json`` (settings, git revision, environment), ``train_summary.json`` (per-epoch history).
* ``psnr.json`` — the finished denoiser's PSNR at each σ on ``psnr_images`` test images beside the noisy
  input's (:mod:`smoothtransfer.evaluation.denoiser_quality`): how good a denoiser is before any classifier
  sees its output.

``load_denoiser(out)`` and ``certify --denoiser out`` read ``checkpoint.pt`` (the newest weights, also while the
run trains). Run directories of earlier versions (``latest.json`` + ``epoch-NNNN/``) still load, but cannot be
resumed: start those afresh in another ``out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from smoothtransfer.data import datasets
from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.denoiser_quality import PSNR_FILE, denoiser_psnr, psnr_table
from smoothtransfer.job_configs import DenoiserConfig
from smoothtransfer.models.denoisers import (
    LATEST,
    DiffusionDenoiser,
    MSEDenoiser,
    create_ddpm_scheduler,
    create_diffusion_unet,
    denoiser_spec,
    load_denoiser,
)
from smoothtransfer.objectives.denoiser import denoiser_objective
from smoothtransfer.train.engine import (
    CHECKPOINT,
    Job,
    StepOutput,
    open_run,
    read_train_state,
    train,
)
from smoothtransfer.utils import (
    amp_dtype,
    amp_name,
    atomic_write_json,
    environment_info,
    git_revision,
    resolve_device,
)

__all__ = ["DEFAULT_LR", "DenoiserConfig", "finished_epochs", "train_denoiser"]

DEFAULT_LR = {"diffusion": 2e-4, "mse": 1e-3}  # Ho et al. 2020; Salman et al. 2020
#: settings a resumed run must share with the run it continues (epochs, lr, ... may change)
RESUME_KEYS = ("kind", "size", "dataset", "image_size", "channels", "sigmas", "batch_size", "max_train", "seed")


def _record(cfg: DenoiserConfig, image_size: int, channels: int, lr: float, amp: str) -> dict:
    """The settings recorded in ``run.json`` and in the checkpoint's ``config["denoiser"]`` (``amp``: the
    precision used; it and ``compile`` may change when a run is resumed)."""
    return {"amp": amp, "compile": cfg.compile, "kind": cfg.kind, "size": cfg.size, "dataset": cfg.dataset,
            "image_size": image_size, "channels": channels, "sigmas": list(cfg.sigmas) if cfg.kind == "mse" else None,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": lr, "weight_decay": cfg.weight_decay,
            "grad_clip": cfg.grad_clip, "max_train": cfg.max_train, "seed": cfg.seed}


def _new_denoiser(cfg: DenoiserConfig, image_size: int, channels: int):
    if cfg.kind == "diffusion":
        return DiffusionDenoiser(create_diffusion_unet(image_size, channels, cfg.size), create_ddpm_scheduler())
    return MSEDenoiser.create(cfg.size, channels=channels, image_size=image_size)


def _trainable(denoiser):
    """The module whose parameters are trained: the UNet of a diffusion denoiser, the DnCNN itself otherwise."""
    return denoiser.unet if getattr(denoiser, "kind", None) == "diffusion" else denoiser


class DenoiserStep(nn.Module):
    """One training step's forward: ``x`` ``(B,C,H,W)`` clean images in [0,1] → the denoiser objective's loss."""

    def __init__(self, denoiser: nn.Module, objective) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.objective = objective

    def forward(self, x: torch.Tensor) -> StepOutput:
        loss, logs = self.objective(self.denoiser, x)
        return StepOutput(loss, logs)


def finished_epochs(out: str | os.PathLike) -> int:
    """Epochs of the denoiser run in ``out`` saved so far (0 when there is none); also for an earlier layout."""
    state = read_train_state(out)
    if state is not None:
        return int(state.get("epoch", 0))
    latest = Path(out) / LATEST
    return len(json.loads(latest.read_text()).get("history", [])) if latest.exists() else 0


def _check_settings(out: Path, config: dict):
    def check(saved_config: dict) -> None:
        saved = saved_config.get("denoiser")
        if saved is None:
            raise UserError(f"{out} holds a classifier run, not a denoiser run; choose another --out")
        for key in RESUME_KEYS:
            if saved.get(key) != config.get(key):
                raise UserError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}, "
                                f"now {key}={config.get(key)!r}")
    return check


def train_denoiser(cfg: DenoiserConfig, *, _stop_after_steps: int | None = None) -> Path:
    """Train (or, with ``resume=True``, continue) the denoiser of ``cfg``; returns ``cfg.out``, loadable with
    ``load_denoiser`` or ``certify --denoiser``. Prints one line per epoch.

    ``_stop_after_steps`` simulates an interruption (tests): KeyboardInterrupt after that many optimiser steps,
    right after the checkpoint written at that point.
    """
    cfg = cfg.validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / LATEST).exists() and not (out / CHECKPOINT).exists():
        raise UserError(f"{out} holds a denoiser run of an earlier version (latest.json, epoch-NNNN/), which "
                        f"cannot be resumed; it still loads with --denoiser; start afresh with another --out")

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
    amp = amp_dtype(cfg.amp, device, training=True)
    config = _record(cfg, h, channels, lr, amp_name(amp))
    existing = open_run(out, epochs=cfg.epochs, resume=cfg.resume, check_settings=_check_settings(out, config),
                        hint="or choose another --out")
    if existing is not None and existing["train_state"].get("finished"):
        print(f"{out}: already trained for {existing['train_state']['epoch']} epoch(s)")
        if cfg.psnr_images and not (out / PSNR_FILE).is_file():
            measure_psnr(cfg, out, device)
        return out
    if existing is None and cfg.resume:
        print(f"no checkpoint in {out}; starting a new run")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    denoiser = _new_denoiser(cfg, h, channels).to(device)
    module = _trainable(denoiser)
    module.requires_grad_(True)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if cfg.compile:
        # in place: state_dict keys, checkpoints and the exported weights are the plain network's
        module.compile()
    objective = denoiser_objective(cfg.kind, cfg.sigmas)
    atomic_write_json(out / "run.json", {"config": config, "lr": lr, "git_rev": git_revision(),
                                         "environment": environment_info()})

    def get_batch(idx: torch.Tensor) -> tuple[torch.Tensor]:
        x = images[idx].to(device, non_blocking=True).float().div_(255.0)
        # Horizontal flips (Ho et al. train their CIFAR-10 DDPM with them; harmless for denoising).
        flip = torch.rand(len(x), device=device) < 0.5
        return (torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x),)

    def begin_epoch(epoch: int, first_step: int) -> None:
        module.train()
        if first_step == 0:  # noise and t draws of a fresh epoch depend on (seed, epoch) alone
            torch.manual_seed(cfg.seed * 100_003 + epoch)

    def export(model: nn.Module) -> None:  # the diffusers-compatible copy of the final weights
        model.eval().save_pretrained(out)

    job = Job(
        out=out, label="denoiser", model=denoiser, step=DenoiserStep(denoiser, objective), optimizer=optimizer,
        params=list(module.parameters()), get_batch=get_batch, n_train=n, batch_size=cfg.batch_size,
        epochs=cfg.epochs, order_seed=lambda e: cfg.seed * 100_003 + e,
        save_info={"classes": None, "dataset": cfg.dataset, "config": {"denoiser": config},
                   "model_spec": denoiser_spec(denoiser)},
        device=device, amp_dtype=amp, grad_clip=max(cfg.grad_clip, 0.0), checkpoint_every=cfg.checkpoint_every,
        progress=cfg.progress, begin_epoch=begin_epoch, finalize=export,
    )
    train(job, existing, _stop_after_steps=_stop_after_steps)
    if cfg.psnr_images:
        measure_psnr(cfg, out, device, denoiser)
    return out


#: the σ a diffusion denoiser is measured at (those of the papers' tables); an MSE denoiser: its training σ
PSNR_SIGMAS = (0.25, 0.5, 1.0)


def measure_psnr(cfg: DenoiserConfig, out: Path, device: torch.device, denoiser: nn.Module | None = None) -> dict:
    """PSNR of the trained denoiser at each σ on ``cfg.psnr_images`` evenly spaced test images (the test split
    of ``cfg.dataset``; its training split if it has none), seeded by ``cfg.seed``; written to
    ``out/psnr.json`` and printed. Returns what was written."""
    if denoiser is None:
        denoiser = load_denoiser(out, device=device)
    try:  # only a missing test split falls back to the training images (then recorded as such)
        datasets.check_available(cfg.dataset, ("test",), root=cfg.data_root)
        split = "test"
    except UserError:
        split = "train"
    ds = datasets.get_dataset(cfg.dataset, split, root=cfg.data_root, min_classes=1)
    images = ds.images
    step = max(1, len(images) // cfg.psnr_images)
    idx = torch.arange(0, len(images), step)[: cfg.psnr_images]
    sigmas = tuple(cfg.sigmas) if cfg.kind == "mse" else PSNR_SIGMAS
    if isinstance(denoiser, DiffusionDenoiser):
        sigmas = tuple(s for s in sigmas if s <= denoiser.max_sigma)
    if not sigmas:
        print(f"no σ within the denoiser's range to measure its PSNR at; {PSNR_FILE} not written")
        return {}
    batches = ((images[j].float().div_(255.0), torch.zeros(len(j), dtype=torch.long))  # labels unused
               for j in idx.split(cfg.batch_size))
    res = denoiser_psnr(denoiser, batches, sigmas, batch_size=cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))
    record = {"dataset": cfg.dataset, "split": split, "num_images": len(idx), "every": step, "seed": cfg.seed,
              "metric": "mean over images of 10·log10(1/MSE), images in [0,1], noise unclipped",
              "psnr": [{"sigma": r.sigma, "denoised_db": r.denoised, "noisy_db": r.noisy, "gain_db": r.gain}
                       for r in res]}
    atomic_write_json(out / PSNR_FILE, record)
    print(f"denoiser PSNR on {len(idx)} {cfg.dataset} {split} images:\n" + psnr_table(res), end="")
    return record
