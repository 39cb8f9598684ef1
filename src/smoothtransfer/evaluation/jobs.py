"""Library entry points of ``smoothtransfer attack`` and ``smoothtransfer noise-profile``.

``run_attack(AttackConfig(...))`` writes ``OUT/attack.json``, ``run_noise_profile(NoiseProfileConfig(...))``
writes ``OUT/noise_profile.json``; both check the config, the checkpoint and the dataset before any work, and
refuse to replace an existing result file unless ``overwrite=True``.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smoothtransfer.data.datasets import get_dataset
from smoothtransfer.data.subsets import evenly_spaced
from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.attacks import certificate_check, check_classifier, robust_accuracy
from smoothtransfer.evaluation.noise_profile import markdown_table, noise_profile
from smoothtransfer.job_configs import SMOOTHED_ATTACKS, AttackConfig, EvalDataConfig, NoiseProfileConfig
from smoothtransfer.models.checkpoint import load_classifier
from smoothtransfer.models.external import parse_source
from smoothtransfer.objectives import OBJECTIVES
from smoothtransfer.utils import atomic_write_json, environment_info, git_revision, resolve_device

CHECKPOINT_STEMS = ("checkpoint", "best", "last", "model", "final")


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation runs on: the classifier (eval mode, on ``device``), the dataset, the selected image
    indices, the number of classes and the model spec."""

    model: torch.nn.Module
    dataset: Any
    indices: list[int]
    device: torch.device
    num_classes: int
    spec: dict


@dataclass(frozen=True)
class EvalResult:
    """The file written and its contents (``record``); ``line`` is the one-line summary the command prints."""

    path: Path
    record: dict[str, Any]
    line: str

    @property
    def violations(self) -> int:
        """certificate-check: certificates broken by the attack (0 for every other job)."""
        return int(self.record.get("violations", 0) or 0)


def output_path(cfg: EvalDataConfig, command: str, filename: str) -> Path:
    """``OUT/filename``; UserError if it exists without ``overwrite`` (checked before any work)."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        src = parse_source(cfg.checkpoint)  # cohen:FILE, hf-hub:ORG/NAME, ...: named after format and file
        ck = Path(src.run_name if src else cfg.checkpoint)
        stem = ck.stem if ck.stem not in CHECKPOINT_STEMS else f"{ck.resolve().parent.name}-{ck.stem}"
        out = Path("runs") / command / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{cfg.dataset}-{cfg.split}")
    path = out / filename
    if path.exists() and not cfg.overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    return path


def _check_head_trained(ckpt: dict, path: str) -> None:
    """UserError for a checkpoint whose training objective ignored labels (SimCLR): its head is untrained."""
    train = (ckpt.get("config") or {}).get("train") or {}
    objective = train.get("objective") if isinstance(train, dict) else None
    name = objective.get("name") if isinstance(objective, dict) else None
    if not name:
        return
    if name in OBJECTIVES and not getattr(OBJECTIVES.get(name), "uses_labels", True):
        raise UserError(
            f"{path} was trained with the self-supervised objective '{name}', so it has no trained "
            f"classifier head; fine-tune it first (smoothtransfer finetune --init CHECKPOINT)"
        )


def load_inputs(cfg: EvalDataConfig) -> EvalInputs:
    """Load and cross-check the checkpoint and the dataset of ``cfg``; nothing is written."""
    device = resolve_device(cfg.device)
    if parse_source(cfg.checkpoint) is None and not Path(cfg.checkpoint).exists():  # cohen:FILE, hf-hub:...
        raise UserError(f"checkpoint {cfg.checkpoint} does not exist")
    model, ckpt = load_classifier(cfg.checkpoint, device=device)
    _check_head_trained(ckpt, cfg.checkpoint)
    dataset = get_dataset(cfg.dataset, cfg.split, root=cfg.data_root)
    classes = list(dataset.classes)
    k = check_classifier(model, len(classes))
    ck_classes = ckpt.get("classes")
    if ck_classes and list(ck_classes) != classes:
        i = next(i for i, (a, b) in enumerate(zip(ck_classes, classes)) if a != b)
        raise UserError(f"checkpoint classes differ from dataset {cfg.dataset}'s: class {i} is "
                        f"'{ck_classes[i]}' in the checkpoint but '{classes[i]}' in the dataset")
    spec = dict(getattr(model, "spec", None) or {})
    shape = tuple(dataset.images.shape[1:]) if hasattr(dataset, "images") else tuple(dataset[0][0].shape)
    want = (int(spec.get("in_chans", shape[0])), int(spec.get("input_size", shape[1])),
            int(spec.get("input_size", shape[2])))
    if shape != want and not (spec.get("resizes_input") and shape[0] == want[0]):  # timm: resizes any size
        raise UserError(f"dataset {cfg.dataset} has {'x'.join(map(str, shape))} images but the checkpoint's "
                        f"model takes {'x'.join(map(str, want))}")
    indices = evenly_spaced(len(dataset), cfg.skip, cfg.max)
    if not indices:
        raise UserError(f"--skip {cfg.skip} --max {cfg.max} select no images of {cfg.dataset} ({cfg.split})")
    return EvalInputs(model=model, dataset=dataset, indices=indices, device=device,
                      num_classes=k if k is not None else len(classes), spec=spec)


def run_info(cfg: EvalDataConfig) -> dict[str, Any]:
    """What every result file records about its inputs, the code and the machine."""
    return {
        "checkpoint": cfg.checkpoint if ":" in cfg.checkpoint and not Path(cfg.checkpoint).exists()
        else str(Path(cfg.checkpoint).resolve()),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "skip": cfg.skip,
        "max": cfg.max,
        "seed": cfg.seed,
        "git_rev": git_revision(),
        "command_line": " ".join(["smoothtransfer", *sys.argv[1:]]),
        "environment": environment_info(),
    }


def run_noise_profile(cfg: NoiseProfileConfig) -> EvalResult:
    """Base-classifier accuracy under Gaussian noise at each σ of ``cfg``; writes ``OUT/noise_profile.json``
    (``accuracy`` per σ, ``sigmas``, ``n``, ``seconds`` and :func:`run_info`)."""
    cfg = cfg.validate()
    path = output_path(cfg, "noise_profile", "noise_profile.json")
    ctx = load_inputs(cfg)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    t0 = time.time()
    prof = noise_profile(ctx.model, ctx.dataset, cfg.sigmas, batch_size=cfg.batch_size, generator=gen,
                         indices=ctx.indices, num_classes=ctx.num_classes)
    record = {
        "accuracy": {f"{s:g}": a for s, a in prof.items()},
        "sigmas": list(cfg.sigmas),
        "n": len(ctx.indices),
        "seconds": time.time() - t0,
        **run_info(cfg),
    }
    atomic_write_json(path, record)
    line = (f"{markdown_table(prof, Path(cfg.checkpoint).stem)}\n"
            f"(n={len(ctx.indices)} images, accuracy in %) -> {path}")
    return EvalResult(path, record, line)


def run_attack(cfg: AttackConfig) -> EvalResult:
    """The attack of ``cfg`` on the base or the smoothed classifier; writes ``OUT/attack.json``. For
    ``certificate-check`` the result's :attr:`EvalResult.violations` counts broken certificates."""
    cfg = cfg.validate()
    path = output_path(cfg, "attack", "attack.json")
    ctx = load_inputs(cfg)
    torch.manual_seed(cfg.seed)
    settings: dict[str, Any] = {"attack": cfg.attack, "steps": cfg.steps}
    if cfg.attack in SMOOTHED_ATTACKS:
        settings.update(sigma=cfg.sigma, m=cfg.m, n=cfg.n, alpha=cfg.alpha)
    t0 = time.time()
    if cfg.attack == "certificate-check":
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        res = certificate_check(ctx.model, ctx.dataset, cfg.sigma, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
                                batch_size=cfg.batch_size, indices=ctx.indices, steps=cfg.steps, m=cfg.m,
                                generator=gen, eps_fraction=cfg.eps_fraction, num_classes=ctx.num_classes,
                                progress=cfg.progress)
        res.pop("seconds", None)
        rows = res.pop("rows")
        record = {**settings, "n0": cfg.n0, "eps_fraction": cfg.eps_fraction, **res,
                  "seconds": time.time() - t0, **run_info(cfg), "rows": rows}
        atomic_write_json(path, record)
        loud = "VIOLATIONS: " if res["violations"] else ""
        line = (f"certificate-check σ={cfg.sigma:g}: {loud}{res['violations']} violation(s) among "
                f"{res['checked']} attacked certificates ({res['certified']}/{res['images']} images certified, "
                f"{res['abstained']} abstained after the attack; N={cfg.n}, α={cfg.alpha:g}, "
                f"{record['seconds']:.1f} s) -> {path}")
        return EvalResult(path, record, line)
    res = robust_accuracy(ctx.model, ctx.dataset, cfg.attack, cfg.eps, cfg.steps, batch_size=cfg.batch_size,
                          indices=ctx.indices, n_restarts=cfg.restarts, step_size=cfg.step_size, seed=cfg.seed,
                          sigma=cfg.sigma, m=cfg.m, n=cfg.n or 1000, alpha=cfg.alpha, num_classes=ctx.num_classes,
                          progress=cfg.progress)
    seconds = time.time() - t0
    record = {**settings, "eps": cfg.eps, "restarts": cfg.restarts, "step_size": cfg.step_size, **res,
              "seconds": seconds, **run_info(cfg)}
    atomic_write_json(path, record)
    what = f"smoothed σ={cfg.sigma:g} " if cfg.attack == "smoothed-pgd" else ""
    line = (f"{cfg.attack} {what}eps={cfg.eps:g}: standard {100 * res['standard_acc']:.1f}%, robust "
            f"{100 * res['robust_acc']:.1f}% (n={res['n']}, {cfg.steps} steps, {seconds:.1f} s) -> {path}")
    return EvalResult(path, record, line)
