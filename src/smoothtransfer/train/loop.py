"""Classifier training: pre-training and fine-tuning, from 2 CPU cores to several GPUs (torchrun/DDP).

:func:`run_training` turns a :class:`~smoothtransfer.config.TrainConfig` into data, a model (fresh, or the
``init`` checkpoint with a fresh head, LoRA or a frozen body), an objective, an optimiser and schedule, and
hands them to the training engine (:mod:`smoothtransfer.train.engine`: the epoch/step loop, the one resume
format in ``OUT/checkpoint.pt``, best-model selection, amp, progress, TensorBoard). Data live in memory as
uint8 ``(N,C,H,W)``; each step indexes a batch, converts it to [0,1] floats and augments it on the device, so
no worker processes are needed at 32 px. The data order of epoch ``e`` is seeded by ``seed * 1000 + e``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
)
from smoothtransfer.models.denoisers import check_compatible, load_denoiser
from smoothtransfer.models.external import parse_source
from smoothtransfer.models.factory import create_classifier
from smoothtransfer.models.lora import apply_lora
from smoothtransfer.objectives import build_objective
from smoothtransfer.train import distributed as D
from smoothtransfer.train.engine import BEST, CHECKPOINT, Job, autocast, open_run, train
from smoothtransfer.train.optim import build_optimizer, build_scheduler, param_groups
from smoothtransfer.utils import (
    amp_dtype,
    amp_name,
    atomic_write_json,
    atomic_write_text,
    environment_info,
    git_revision,
    resolve_device,
    seed_everything,
)

__all__ = ["BEST", "CHECKPOINT", "check_out_dir", "evaluate", "prepare", "run_training"]


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
        with autocast(device, amp_dtype):
            correct["acc"] += (model(x).argmax(1) == y).sum().item()
            for s in sigmas:
                noise = torch.randn(x.shape, generator=g, device=device, dtype=torch.float32)
                correct[f"acc_sigma_{s}"] += (model(x + s * noise).argmax(1) == y).sum().item()
    model.train(was_training)
    return {k: v / len(images) for k, v in correct.items()}


# ----------------------------------------------------------------------------------------------------
# settings of a run directory


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

    A finished run with the same settings is reused (its ``train_state["finished"]`` is true); different
    settings or an unfinished run without ``--resume`` are UserErrors, so nothing is overwritten by accident.
    """
    def check(saved: dict) -> None:
        if _saved_for_compare(saved.get("train", {})) != _config_for_compare(cfg):
            raise UserError(f"{cfg.out} holds a run with other settings; use another --out (or --overwrite)")

    return open_run(cfg.out, epochs=cfg.epochs, resume=resume, overwrite=overwrite, check_settings=check)


# ----------------------------------------------------------------------------------------------------
# the run


def _writer(cfg: TrainConfig, out: Path):
    """A TensorBoard writer, or None. tensorboard comes with the [tensorboard] extra: without it the run trains
    and logs to train_summary.json as usual, and says once how to get the TensorBoard logs."""
    if not cfg.tensorboard:
        return None
    try:
        require("tensorboard", "TensorBoard logging")
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(out / "tb"))
    except MissingExtra as e:
        print(f"note: {e} (or set tensorboard=false)", flush=True)
        return None


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
    steps_per_epoch = max(1, n_train // cfg.batch_size)

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
    if cfg.compile:
        # in place, after the EMA copy was made: parameters, state_dict keys and checkpoints are the plain
        # model's; train and eval mode compile once each
        model.compile()
    amp = amp_dtype(cfg.amp, device, training=True)
    uses_labels = getattr(objective, "uses_labels", True)
    augment = TRAIN_AUGMENTS.get(cfg.data.augment) if cfg.data.augment != "none" and uses_labels else None

    def get_batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _to_float(prep.train_images[idx], device)
        y = prep.train_targets[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def begin_epoch(epoch: int, first_step: int) -> None:
        if hasattr(objective, "set_epoch"):
            objective.set_epoch(epoch)
        set_train_mode(model, prep.frozen_backbone)

    def train_acc(result, batch) -> dict[str, float]:
        return {"train_acc": (result.logits.argmax(1) == batch[1]).float().mean().item()}

    def validate(eval_model: nn.Module) -> dict[str, float]:
        val = evaluate(eval_model, prep.val_images, prep.val_targets, device, cfg.eval_batch_size,
                       tuple(cfg.eval_sigmas), seed=cfg.seed, amp_dtype=amp)
        return {f"val_{k}": v for k, v in val.items()}

    def select_best(eval_model: nn.Module) -> None:
        if cfg.select == "best" and (out / BEST).exists():
            eval_model.load_state_dict(load_checkpoint(out / BEST)["state_dict"])

    writer = None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        atomic_write_json(out / "run_info.json", {
            "git_rev": git_revision(), "env": environment_info(), "seed": cfg.seed,
            "world_size": dist.world_size, "n_train": n_train, "n_val": len(prep.val_targets),
            "amp": {"asked": cfg.amp, "used": amp_name(amp)},
            "compile": cfg.compile,
            "classes": prep.classes, "dataset": prep.dataset,
        })
        writer = _writer(cfg, out)

    job = Job(
        out=out, label=cfg.stage, model=model, step=TrainStep(model, objective), optimizer=optimizer,
        params=[p for g in groups for p in g["params"]], get_batch=get_batch, n_train=n_train,
        batch_size=cfg.batch_size, epochs=cfg.epochs, order_seed=lambda e: cfg.seed * 1000 + e,
        save_info={"classes": prep.classes, "dataset": prep.dataset, "config": {"train": _config_for_compare(cfg)}},
        device=device, scheduler=scheduler, ema=ema, extra_state={"objective": objective}, amp_dtype=amp,
        grad_clip=cfg.optim.grad_clip, checkpoint_every=cfg.checkpoint_every, keep_best=True,
        progress=cfg.progress, dist=dist, writer=writer, begin_epoch=begin_epoch,
        batch_logs=train_acc if uses_labels else None, evaluate=validate if uses_labels else None,
        finalize=select_best, summary={"select": cfg.select},
    )
    train(job, existing, _stop_after_steps=_stop_after_steps)
    D.barrier(dist)
    D.cleanup(dist)
    return out / CHECKPOINT
