"""The trainer: one loop for pre-training and fine-tuning, from 2 CPU cores to several GPUs (torchrun/DDP).

Data live in memory as uint8 ``(N,C,H,W)``; each step indexes a batch, converts it to [0,1] floats and
augments it on the device, so no worker processes are needed at 32 px. The data order of epoch ``e`` is a
permutation seeded by ``(seed, e)`` and the global RNG state is saved with every checkpoint, so a resumed run
(after an interruption at any checkpoint, mid-epoch included) continues exactly as the uninterrupted run.

Why one file (~520 lines): :func:`run_training` is one loop whose exact resume (data order, RNG, optimiser
and scheduler state, best-model selection) depends on every step of it; the helpers above it build its
inputs and are used nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothtransfer._optional import MissingExtra, require
from smoothtransfer.config import TrainConfig, dump_yaml, from_dict, to_dict
from smoothtransfer.data.datasets import get_dataset
from smoothtransfer.data.subsets import k_shot_indices, train_val_split
from smoothtransfer.data.transforms import TRAIN_AUGMENTS
from smoothtransfer.errors import UserError
from smoothtransfer.models.checkpoint import (
    build_from_spec,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
)
from smoothtransfer.models.denoisers import check_compatible, load_denoiser
from smoothtransfer.models.external import parse_source
from smoothtransfer.models.factory import create_classifier
from smoothtransfer.models.lora import apply_lora
from smoothtransfer.objectives import build_objective
from smoothtransfer.train import distributed as D
from smoothtransfer.train.optim import build_optimizer, build_scheduler, param_groups
from smoothtransfer.utils import (
    atomic_write_json,
    atomic_write_text,
    auto_amp,
    environment_info,
    git_revision,
    resolve_device,
    seed_everything,
)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


@dataclass
class Prepared:
    """Everything a run needs, built and validated before the first step."""

    model: nn.Module
    objective: nn.Module
    train_images: torch.Tensor  # uint8 (N,C,H,W)
    train_targets: torch.Tensor  # int64 (N,)
    val_images: torch.Tensor
    val_targets: torch.Tensor
    classes: list[str]
    dataset: str
    head_names: set[str]
    frozen_backbone: bool


# ----------------------------------------------------------------------------------------------------
# preparation


def _split_data(cfg: TrainConfig):
    ds = get_dataset(cfg.data.dataset, cfg.data.split, root=cfg.data.data_root, download=cfg.data.download)
    if cfg.data.max_classes is not None:
        k = cfg.data.max_classes
        if k > len(ds.classes):
            raise UserError(f"data.max_classes={k} but {cfg.data.dataset} has only {len(ds.classes)} classes")
        ds = ds.subset(torch.nonzero(ds.targets < k).flatten())
        ds.classes = list(ds.classes[:k])
    targets = ds.targets
    if cfg.data.val_fraction > 0:
        tr_idx, va_idx = train_val_split(targets, cfg.data.val_fraction, cfg.seed)
    else:
        tr_idx, va_idx = torch.arange(len(ds)), torch.arange(0)
    tr_idx, va_idx = torch.as_tensor(tr_idx), torch.as_tensor(va_idx)
    if cfg.data.shots_per_class is not None:
        sub = torch.as_tensor(k_shot_indices(targets[tr_idx], cfg.data.shots_per_class, cfg.seed))
        tr_idx = tr_idx[sub]
    g = torch.Generator().manual_seed(cfg.seed + 7)
    if cfg.data.max_train is not None and len(tr_idx) > cfg.data.max_train:
        tr_idx = tr_idx[torch.randperm(len(tr_idx), generator=g)[: cfg.data.max_train]].sort().values
    if cfg.data.max_val is not None and len(va_idx) > cfg.data.max_val:
        va_idx = va_idx[torch.randperm(len(va_idx), generator=g)[: cfg.data.max_val]].sort().values
    return ds, tr_idx, va_idx


def _build_model(cfg: TrainConfig, ds) -> tuple[nn.Module, set[str], bool]:
    info = ds.info
    num_classes = len(ds.classes)
    if cfg.stage == "pretrain":
        model = create_classifier(cfg.model.arch or "resnet20", num_classes, norm=cfg.model.norm,
                                  mean=tuple(info.mean), std=tuple(info.std), input_size=info.image_size,
                                  in_chans=info.channels, pretrained=cfg.model.pretrained, **cfg.model.kwargs)
    else:
        if parse_source(cfg.init) is not None:  # cohen:FILE, hf-hub:ORG/NAME, ...: a model trained elsewhere
            loaded, ckpt = load_classifier(cfg.init)
            ckpt = {**ckpt, "state_dict": loaded.state_dict()}
        else:
            ckpt = load_checkpoint(cfg.init)
        spec = dict(ckpt["model_spec"])
        if cfg.model.arch is not None and cfg.model.arch != spec["arch"]:
            raise UserError(f"cannot fine-tune {cfg.init} (a {spec['arch']} checkpoint) as model '{cfg.model.arch}'")
        if cfg.model.norm is not None and cfg.model.norm != spec.get("norm"):
            raise UserError(f"cannot fine-tune {cfg.init} (norm '{spec.get('norm')}') with norm '{cfg.model.norm}'")
        if spec.get("lora"):
            raise UserError(f"{cfg.init} holds a LoRA-adapted model; merge it before fine-tuning again")
        model = build_from_spec(spec)
        model.load_state_dict(ckpt["state_dict"])
        if cfg.keep_head:
            if list(ckpt.get("classes") or []) != list(ds.classes):
                raise UserError(f"keep_head needs the checkpoint's classes, but {cfg.init} was trained on "
                                f"{len(ckpt.get('classes') or [])} other classes than {cfg.data.dataset}'s")
        else:
            # The upstream head is replaced by a fresh one for the downstream classes.
            model.reset_head(num_classes)
    spec = model.spec
    resizes = spec.get("resizes_input")  # a timm classifier: resizes any input to its own size
    if (spec.get("input_size") not in (None, info.image_size) and not resizes) or spec.get("in_chans", 3) != info.channels:
        raise UserError(f"model expects {spec.get('in_chans')}x{spec.get('input_size')} px images but "
                        f"{cfg.data.dataset} has {info.channels}x{info.image_size} px")
    head_params = {id(p) for p in model.head_parameters()}
    frozen = cfg.stage == "finetune" and cfg.mode in ("fixed", "head")
    if cfg.stage == "finetune" and cfg.mode == "lora":
        model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        head_params = {id(p) for p in model.head_parameters()}
    elif frozen:
        model.freeze_backbone()  # head only; the body stays in eval mode (norm statistics frozen, rule 9)
    head_names = {n for n, p in model.named_parameters() if id(p) in head_params}
    return model, head_names, frozen


def _build_objective(cfg: TrainConfig, model: nn.Module, device: torch.device) -> nn.Module:
    params = dict(cfg.objective.params)
    if cfg.objective.name == "simclr":
        params.setdefault("feature_dim", model.num_features)
    if cfg.objective.name == "ftcadis":
        if cfg.denoiser is None:
            raise UserError("objective ftcadis needs a denoiser: pass --denoiser DIR")

        denoiser = load_denoiser(cfg.denoiser, device)
        check_compatible(denoiser, model.spec)
        params["denoiser"] = denoiser
    return build_objective(cfg.objective.name, **params)


def prepare(cfg: TrainConfig, device: torch.device) -> Prepared:
    ds, tr_idx, va_idx = _split_data(cfg)
    model, head_names, frozen = _build_model(cfg, ds)
    objective = _build_objective(cfg, model, device)
    return Prepared(
        model=model, objective=objective,
        train_images=ds.images[tr_idx], train_targets=ds.targets[tr_idx],
        val_images=ds.images[va_idx], val_targets=ds.targets[va_idx],
        classes=list(ds.classes), dataset=cfg.data.dataset, head_names=head_names, frozen_backbone=frozen,
    )


# ----------------------------------------------------------------------------------------------------
# the step module (so that DDP sees every model call of an objective inside one forward)


class TrainStep(nn.Module):
    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.objective(self.model, x, y)


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """Train mode. A frozen backbone (``Classifier.freeze_backbone``) stays in eval mode by itself, so its
    norm statistics (BatchNorm running mean/var) do not drift while only the head learns (rule 9)."""
    model.train()


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    amp = cfg.amp
    if amp == "auto":
        amp = auto_amp(device)
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_float(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images_u8.to(device, non_blocking=True).float().div_(255.0)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, device: torch.device,
             batch_size: int = 512, sigmas: tuple = (), seed: int = 0,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Clean accuracy, and accuracy under Gaussian noise at each σ (fixed seed), of ``model`` on uint8 images."""
    if len(images) == 0:
        return {}
    was_training = model.training
    model.eval()
    correct = {"acc": 0}
    for s in sigmas:
        correct[f"acc_sigma_{s}"] = 0
    g = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(images), batch_size):
        x = _to_float(images[i:i + batch_size], device)
        y = targets[i:i + batch_size].to(device)
        with _autocast(device, amp_dtype):
            correct["acc"] += (model(x).argmax(1) == y).sum().item()
            for s in sigmas:
                noise = torch.randn(x.shape, generator=g, device=device, dtype=torch.float32)
                correct[f"acc_sigma_{s}"] += (model(x + s * noise).argmax(1) == y).sum().item()
    model.train(was_training)
    return {k: v / len(images) for k, v in correct.items()}


# ----------------------------------------------------------------------------------------------------
# checkpoint state


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _config_for_compare(cfg: TrainConfig) -> dict:
    d = to_dict(cfg)
    for k in ("device", "progress", "tensorboard", "threads", "checkpoint_every"):
        d.pop(k, None)
    return json.loads(json.dumps(d))


def _saved_for_compare(saved: dict) -> dict:
    """A checkpoint's recorded settings with keys added to TrainConfig since then filled with their defaults,
    so that a new config field (at its default) does not make every earlier run count as "other settings"."""
    try:
        return _config_for_compare(from_dict(TrainConfig, saved))
    except UserError:  # a key this version no longer knows: genuinely other settings
        return json.loads(json.dumps(saved))


def check_out_dir(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> dict | None:
    """Decide what to do with an existing run directory. Returns the checkpoint to resume from (or None).

    A finished run with the same settings is reused (returns a dict with ``finished``); different settings
    or an unfinished run without ``--resume`` are UserErrors, so nothing is overwritten by accident.
    """
    path = Path(cfg.out) / CHECKPOINT
    if not path.exists() or overwrite:
        return None
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config") or {}
    if _saved_for_compare(saved.get("train", {})) != _config_for_compare(cfg):
        raise UserError(f"{cfg.out} holds a run with other settings; use another --out (or --overwrite)")
    state = ckpt.get("train_state") or {}
    if state.get("finished"):
        return ckpt
    if not resume:
        raise UserError(f"{cfg.out} holds an interrupted run: pass --resume to continue it (or --overwrite)")
    return ckpt


# ----------------------------------------------------------------------------------------------------
# the loop


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
                 _stop_after_steps: int | None = None) -> Path:
    """Train according to ``cfg``; returns the path of the final ``checkpoint.pt``.

    ``_stop_after_steps`` simulates an interruption (tests): the run raises KeyboardInterrupt after that many
    optimiser steps, right after the checkpoint that ``checkpoint_every`` would write.
    """
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    existing = check_out_dir(cfg, resume, overwrite)
    if existing is not None and existing["train_state"].get("finished"):
        print(f"{out}: finished run with the same settings found; reusing {out / CHECKPOINT}")
        return out / CHECKPOINT

    device = resolve_device(cfg.device)
    dist = D.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed_everything(cfg.seed + dist.rank)
    prep = prepare(cfg, device)
    model = prep.model.to(device)
    objective = prep.objective.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    n_train = len(prep.train_targets)
    if n_train == 0:
        raise UserError(f"no training images left in {cfg.data.dataset} after the validation split/subsets")
    global_bs = cfg.batch_size
    per_rank_bs = max(1, global_bs // dist.world_size)
    steps_per_epoch = max(1, n_train // global_bs) if n_train >= global_bs else 1

    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    named += [(f"objective.{n}", p) for n, p in objective.named_parameters()]
    head_names = {f"model.{n}" for n in prep.head_names}
    groups = param_groups(named, cfg.optim.weight_decay, cfg.optim.lr, head_names, cfg.optim.head_lr_mult)
    if not groups:
        raise UserError("nothing to train: every parameter is frozen")
    optimizer = build_optimizer(cfg.optim, groups)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.epochs)
    ema = None
    if cfg.optim.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema))
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    step_module: nn.Module = TrainStep(model, objective)
    if dist.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)

    start_epoch, start_step, best = 0, 0, -math.inf
    history: list[dict] = []
    sums: dict[str, float] = {}
    count = 0
    if existing is not None:  # resume
        st = existing["train_state"]
        model.load_state_dict(st.get("raw_model") or existing["state_dict"])
        objective.load_state_dict(st["objective"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if ema is not None and st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, start_step, best = st["epoch"], st["step_in_epoch"], st.get("best", -math.inf)
        history = list(st.get("history", []))
        if start_step:
            sums, count = dict(st.get("epoch_sums") or {}), int(st.get("epoch_count") or 0)
        _set_rng_state(st["rng"], device)
        if dist.is_main:
            print(f"resuming {out} at epoch {start_epoch + 1}, step {start_step}")

    writer = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        atomic_write_json(out / "run_info.json", {
            "git_rev": git_revision(), "env": environment_info(), "seed": cfg.seed,
            "world_size": dist.world_size, "n_train": n_train, "n_val": len(prep.val_targets),
            "amp": {"asked": cfg.amp, "used": {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]},
            "classes": prep.classes, "dataset": prep.dataset,
        })
        if cfg.tensorboard:
            # tensorboard comes with the [tensorboard] extra: without it the run trains and logs to
            # train_summary.json as usual, and says once how to get the TensorBoard logs.
            try:
                require("tensorboard", "TensorBoard logging")
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tb"))
            except MissingExtra as e:
                print(f"note: {e} (or set tensorboard=false)", flush=True)
                writer = None

    def weights_for_eval() -> nn.Module:
        return ema.module if ema is not None else model

    def save(epoch: int, step_in_epoch: int, finished: bool, path: Path | None = None) -> None:
        if not dist.is_main:
            return
        eval_model = weights_for_eval()
        train_state = {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "finished": finished, "best": best,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "objective": objective.state_dict(), "rng": _rng_state(device),
            "raw_model": model.state_dict() if ema is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history,
            # running sums of the epoch in progress, so a mid-epoch resume logs the same epoch means
            "epoch_sums": dict(sums) if step_in_epoch else {},
            "epoch_count": count if step_in_epoch else 0,
        }
        save_checkpoint(path or out / CHECKPOINT, eval_model, classes=prep.classes, dataset=prep.dataset,
                        config={"train": _config_for_compare(cfg)}, epoch=epoch, train_state=train_state)

    global_step = start_epoch * steps_per_epoch + start_step
    steps_done_here = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(objective, "set_epoch"):
                objective.set_epoch(epoch)
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            set_train_mode(model, prep.frozen_backbone)
            first = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums, count = {}, 0
            count_before = count
            t0 = time.time()
            bar = tqdm(range(first, steps_per_epoch), desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and dist.is_main), leave=False, dynamic_ncols=True)
            for step in bar:
                idx = perm[step * global_bs:(step + 1) * global_bs]
                idx = idx[dist.rank * per_rank_bs:(dist.rank + 1) * per_rank_bs]
                x = _to_float(prep.train_images[idx], device)
                y = prep.train_targets[idx].to(device, non_blocking=True)
                if cfg.data.augment != "none" and getattr(objective, "uses_labels", True):
                    x = TRAIN_AUGMENTS.get(cfg.data.augment)(x)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, amp_dtype):
                    out_ = step_module(x, y)
                loss = out_.loss
                if not torch.isfinite(loss):
                    raise RuntimeError(f"non-finite loss {loss.item()} at epoch {epoch + 1} step {step}")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.optim.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                global_step += 1
                steps_done_here += 1
                logs = {"loss": loss.item(), **{k: float(v) for k, v in out_.logs.items()}}
                if getattr(objective, "uses_labels", True):
                    logs["train_acc"] = (out_.logits.argmax(1) == y).float().mean().item()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.set_postfix({k: f"{sums[k] / count:.3f}" for k in ("loss", "train_acc") if k in sums})
                if writer is not None and global_step % 10 == 0:
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, global_step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
                last_in_epoch = step + 1 == steps_per_epoch
                if not last_in_epoch and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    save(epoch, step + 1, False)
                if _stop_after_steps is not None and steps_done_here >= _stop_after_steps and not last_in_epoch:
                    save(epoch, step + 1, False)
                    raise KeyboardInterrupt
            bar.close()
            seconds = time.time() - t0
            record = {"epoch": epoch + 1, **{f"train_{k}" if not k.startswith("train") else k: v / max(count, 1)
                                              for k, v in sums.items()},
                      "images_per_s": (count - count_before) * global_bs / max(seconds, 1e-9), "seconds": seconds}
            if getattr(objective, "uses_labels", True):
                val = evaluate(weights_for_eval(), prep.val_images, prep.val_targets, device,
                               cfg.eval_batch_size, tuple(cfg.eval_sigmas), seed=cfg.seed, amp_dtype=amp_dtype)
                record.update({f"val_{k}": v for k, v in val.items()})
            history.append(record)
            if dist.is_main:
                msg = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
                tqdm.write(f"[{cfg.stage}] epoch {epoch + 1}/{cfg.epochs}: {msg}")
                if writer is not None:
                    for k, v in record.items():
                        if k != "epoch":
                            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            score = record.get("val_acc", -record.get("train_loss", 0.0))
            is_best = score > best
            if is_best:
                best = score
            finished = epoch + 1 == cfg.epochs
            # Write best.pt first: checkpoint.pt marked finished must never point at a stale best.
            if is_best:
                save(epoch + 1, 0, False, out / BEST)
            if not finished:
                save(epoch + 1, 0, False)
            if _stop_after_steps is not None and steps_done_here >= _stop_after_steps and not finished:
                raise KeyboardInterrupt
    finally:
        if writer is not None:
            writer.close()

    if dist.is_main:
        if cfg.select == "best" and (out / BEST).exists():
            model_to_load = weights_for_eval()
            model_to_load.load_state_dict(load_checkpoint(out / BEST)["state_dict"])
        save(cfg.epochs, 0, True)
        atomic_write_json(out / "train_summary.json", {"history": history, "best_val": best,
                                                        "select": cfg.select})
    D.barrier(dist)
    D.cleanup(dist)
    return out / CHECKPOINT
