"""The training engine: one epoch/step loop and one resume format, for classifiers and denoisers alike.

A caller (:func:`smoothtransfer.train.loop.run_training`, :func:`smoothtransfer.train.denoiser.train_denoiser`)
builds the model, the optimiser and a :class:`Job` saying how to draw a batch and what to do around each epoch;
:func:`train` runs it. Everything a run needs to continue lives in **one file**, ``OUT/checkpoint.pt``
(:func:`smoothtransfer.models.checkpoint.save_checkpoint`: atomic, ``weights_only``), whose ``train_state`` is::

    epoch, step_in_epoch   where the run stands (epochs done, optimiser steps done in the epoch in progress)
    finished               the final checkpoint (after the last epoch and the job's ``finalize``)
    optimizer, scheduler   their state_dicts (scheduler None when the job has none)
    rng                    the global torch RNG state (and the CUDA one of the device)
    raw_model, ema         with EMA: the trained weights and the average (the checkpoint's weights are the EMA)
    scaler                 the fp16 GradScaler state, or None
    <extra>                the state_dict of each module in ``Job.extra_state`` (e.g. ``objective``)
    best, history          best selection score and the per-epoch records
    epoch_sums, epoch_count  running log sums of the epoch in progress (a mid-epoch resume logs the same means)

The data order of epoch ``e`` is a permutation seeded by ``Job.order_seed(e)`` and the RNG state is restored on
resume, so a run resumed from any checkpoint (mid-epoch included) continues bit for bit as the uninterrupted run.
:func:`open_run` decides what an existing ``OUT`` means: a finished run with the same settings is reused, other
settings are a one-line UserError, an unfinished run needs ``resume=True``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from smoothtransfer.errors import UserError
from smoothtransfer.models.checkpoint import RUN_CHECKPOINT, load_checkpoint, save_checkpoint
from smoothtransfer.train.distributed import DistInfo
from smoothtransfer.utils import atomic_write_json

CHECKPOINT = RUN_CHECKPOINT  # "checkpoint.pt"
BEST = "best.pt"


class StepOutput(NamedTuple):
    """What a step module returns (as a classifier objective's ``ObjectiveOutput`` does, without logits)."""

    loss: torch.Tensor  # scalar
    logs: dict[str, float]


# ----------------------------------------------------------------------------------------------------
# precision and RNG


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------------
# the run directory


def read_train_state(out: str | Path) -> dict[str, Any] | None:
    """The ``train_state`` of ``OUT/checkpoint.pt`` (memory-mapped: the weights are not read), or None."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    return load_checkpoint(path, mmap=True).get("train_state") or {}


def open_run(out: str | Path, *, epochs: int, resume: bool, overwrite: bool = False,
             check_settings: Callable[[dict], None], hint: str = "or --overwrite") -> dict | None:
    """What to do with an existing run directory: the checkpoint to resume from or reuse, or None (fresh run).

    ``check_settings(saved_config)`` raises a UserError when the checkpoint's recorded ``config`` belongs to a
    run with other settings. A finished run of at least ``epochs`` epochs is returned for reuse (its
    ``train_state["finished"]`` is true); an unfinished one (or a finished one of fewer epochs, where the
    settings allow more) without ``resume`` is a UserError ending with ``hint``, so nothing is overwritten by
    accident.
    """
    path = Path(out) / CHECKPOINT
    if not path.exists() or overwrite:
        return None
    ckpt = load_checkpoint(path)
    check_settings(ckpt.get("config") or {})
    state = ckpt.get("train_state") or {}
    if state.get("finished") and int(state.get("epoch", 0)) >= epochs:
        return ckpt
    if not resume:
        what = "a finished run of fewer epochs" if state.get("finished") else "an interrupted run"
        raise UserError(f"{out} holds {what}: pass --resume to continue it ({hint})")
    if state.get("finished"):  # continued for more epochs: no longer the final checkpoint
        ckpt["train_state"] = {**state, "finished": False}
    return ckpt


# ----------------------------------------------------------------------------------------------------
# the job


@dataclass
class Job:
    """What :func:`train` trains and how. Callbacks receive plain values; none of them may draw from the global
    RNG except ``get_batch`` and ``step`` (and ``begin_epoch`` at a fresh epoch), or resume is no longer exact.

    ``step``: a module called as ``step(*batch)`` under autocast that returns an object with ``.loss`` (scalar
    tensor) and ``.logs`` (dict of floats); it is wrapped in DDP when ``dist`` is distributed.
    ``get_batch(indices (B,) int64) -> batch``: the step's inputs on the device (augmented).
    ``save_info``: ``classes``, ``dataset``, ``config`` (what ``check_settings`` compares) and, for a model
    without ``.spec``, ``model_spec`` — the rest of the checkpoint's envelope.
    """

    out: Path
    label: str  # progress bar and epoch lines: "pretrain", "finetune", "denoiser"
    model: nn.Module  # the trained weights (the checkpoint's state_dict, unless EMA)
    step: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # what gradient clipping sees
    get_batch: Callable[[torch.Tensor], tuple]
    n_train: int
    batch_size: int  # global: every rank takes its slice of each batch
    epochs: int
    order_seed: Callable[[int], int]  # seed of epoch e's data order
    save_info: dict[str, Any]
    device: torch.device
    scheduler: Any = None  # stepped once per optimiser step
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of ``model``
    extra_state: dict[str, nn.Module] = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    checkpoint_every: int = 0  # also save every this many steps within an epoch (0: at epoch ends only)
    keep_best: bool = False  # write best.pt when the epoch's score (val_acc, else -train_loss) improves
    progress: bool = True
    dist: DistInfo = field(default_factory=DistInfo)
    writer: Any = None  # a TensorBoard SummaryWriter (closed by train)
    begin_epoch: Callable[[int, int], None] | None = None  # (epoch, first step): objective epoch, train mode
    batch_logs: Callable[[Any, tuple], dict[str, float]] | None = None  # (step output, batch) -> more logs
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # epoch end, weights used for eval
    finalize: Callable[[nn.Module], None] | None = None  # before the final checkpoint: select best, export
    summary: dict[str, Any] = field(default_factory=dict)  # more keys of train_summary.json

    @property
    def steps_per_epoch(self) -> int:
        """Full batches only (the last partial one is dropped), at least one (a tiny dataset is one batch)."""
        return max(1, self.n_train // self.batch_size)

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model


# ----------------------------------------------------------------------------------------------------
# the loop


def train(job: Job, resume_from: dict | None = None, _stop_after_steps: int | None = None) -> list[dict]:
    """Run ``job`` from the start or from the checkpoint ``resume_from`` (as :func:`open_run` returns it) to
    the end; write ``OUT/checkpoint.pt`` (every epoch, every ``checkpoint_every`` steps, finally with
    ``finished``), ``best.pt`` (``keep_best``) and ``train_summary.json``. Returns the per-epoch history.

    ``_stop_after_steps`` simulates an interruption (tests): KeyboardInterrupt after that many optimiser steps,
    right after the checkpoint written at that point.
    """
    dist, device, out = job.dist, job.device, Path(job.out)
    model, optimizer, scheduler, ema = job.model, job.optimizer, job.scheduler, job.ema
    scaler = torch.amp.GradScaler(device.type) if job.amp_dtype == torch.float16 else None
    step_module = job.step
    if dist.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    start_epoch, start_step, best = 0, 0, -math.inf
    history: list[dict] = []
    sums: dict[str, float] = {}
    count = 0
    if resume_from is not None:
        st = resume_from["train_state"]
        model.load_state_dict(st.get("raw_model") or resume_from["state_dict"])
        for name, module in job.extra_state.items():
            module.load_state_dict(st[name])
        optimizer.load_state_dict(st["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(st["scheduler"])
        if ema is not None and st.get("ema") is not None:
            ema.load_state_dict(st["ema"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, start_step, best = st["epoch"], st["step_in_epoch"], st.get("best", -math.inf)
        history = list(st.get("history", []))
        if start_step:
            sums, count = dict(st.get("epoch_sums") or {}), int(st.get("epoch_count") or 0)
        set_rng_state(st["rng"], device)
        if dist.is_main:
            print(f"resuming {out} at epoch {start_epoch + 1}, step {start_step}")

    def save(epoch: int, step_in_epoch: int, finished: bool, path: Path | None = None) -> None:
        if not dist.is_main:
            return
        train_state = {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "finished": finished, "best": best,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            **{name: module.state_dict() for name, module in job.extra_state.items()},
            "rng": rng_state(device),
            "raw_model": model.state_dict() if ema is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history,
            "epoch_sums": dict(sums) if step_in_epoch else {},
            "epoch_count": count if step_in_epoch else 0,
        }
        save_checkpoint(path or out / CHECKPOINT, job.eval_model, epoch=epoch, train_state=train_state,
                        **job.save_info)

    steps_per_epoch, global_bs = job.steps_per_epoch, job.batch_size
    per_rank_bs = max(1, global_bs // dist.world_size)
    writer = job.writer
    global_step = start_epoch * steps_per_epoch + start_step
    steps_done_here = 0
    try:
        for epoch in range(start_epoch, job.epochs):
            first = start_step if epoch == start_epoch else 0
            if job.begin_epoch is not None:
                job.begin_epoch(epoch, first)
            perm = torch.randperm(job.n_train, generator=torch.Generator().manual_seed(job.order_seed(epoch)))
            if epoch != start_epoch:
                sums, count = {}, 0
            count_before = count
            t0 = time.time()
            bar = tqdm(range(first, steps_per_epoch), desc=f"{job.label} epoch {epoch + 1}/{job.epochs}",
                       disable=not (job.progress and dist.is_main), leave=False, dynamic_ncols=True)
            for step in bar:
                idx = perm[step * global_bs:(step + 1) * global_bs]
                idx = idx[dist.rank * per_rank_bs:(dist.rank + 1) * per_rank_bs]
                batch = job.get_batch(idx)
                with autocast(device, job.amp_dtype):
                    result = step_module(*batch)
                loss = result.loss
                if not torch.isfinite(loss):
                    raise UserError(f"{job.label}: the loss became {loss.item()} at epoch {epoch + 1}, step "
                                    f"{step + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if job.grad_clip:
                    torch.nn.utils.clip_grad_norm_(job.params, job.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                global_step += 1
                steps_done_here += 1
                logs = {"loss": loss.item(), **{k: float(v) for k, v in result.logs.items()}}
                if job.batch_logs is not None:
                    logs.update(job.batch_logs(result, batch))
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.set_postfix({k: f"{sums[k] / count:.3f}" for k in ("loss", "train_acc") if k in sums})
                if writer is not None and global_step % 10 == 0:
                    for k, v in logs.items():
                        writer.add_scalar(f"train/{k}", v, global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                last_in_epoch = step + 1 == steps_per_epoch
                if not last_in_epoch and job.checkpoint_every and (step + 1) % job.checkpoint_every == 0:
                    save(epoch, step + 1, False)
                if _stop_after_steps is not None and steps_done_here >= _stop_after_steps and not last_in_epoch:
                    save(epoch, step + 1, False)
                    raise KeyboardInterrupt
            bar.close()
            seconds = time.time() - t0
            record = {"epoch": epoch + 1, **{f"train_{k}" if not k.startswith("train") else k: v / max(count, 1)
                                              for k, v in sums.items()},
                      "images_per_s": (count - count_before) * global_bs / max(seconds, 1e-9), "seconds": seconds}
            if job.evaluate is not None:
                record.update(job.evaluate(job.eval_model))
            history.append(record)
            if dist.is_main:
                msg = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
                tqdm.write(f"[{job.label}] epoch {epoch + 1}/{job.epochs}: {msg}")
                if writer is not None:
                    for k, v in record.items():
                        if k != "epoch":
                            writer.add_scalar(f"epoch/{k}", v, epoch + 1)
            finished = epoch + 1 == job.epochs
            if job.keep_best:
                score = record.get("val_acc", -record.get("train_loss", 0.0))
                if score > best:
                    best = score
                    # best.pt is written before checkpoint.pt: a finished checkpoint never points at a stale best
                    save(epoch + 1, 0, False, out / BEST)
            if not finished:
                save(epoch + 1, 0, False)
            if _stop_after_steps is not None and steps_done_here >= _stop_after_steps and not finished:
                raise KeyboardInterrupt
    finally:
        if writer is not None:
            writer.close()

    if dist.is_main:
        if job.finalize is not None:
            job.finalize(job.eval_model)
        save(job.epochs, 0, True)
        atomic_write_json(out / "train_summary.json", {"history": history,
                                                        **({"best_val": best} if job.keep_best else {}),
                                                        **job.summary})
    return history
