"""Library entry points of ``smoothtransfer certify`` and ``smoothtransfer predict``: a checkpoint and a dataset
named in a :class:`~smoothtransfer.job_configs.CertifyConfig` / ``PredictConfig`` → result directory.

``certify_run(CertifyConfig(checkpoint=..., dataset="cifar10", sigmas=(0.25, 0.5)))`` loads and cross-checks
the checkpoint, the dataset and any denoiser (nothing is written before every check passed), then runs
:func:`~smoothtransfer.smoothing.runner.certify_dataset`, which writes ``sigma_<σ>.tsv``, sidecars and
``summary.json`` and resumes an interrupted run. Under ``torchrun`` each rank certifies its shard and rank 0
merges. For a model already in memory, call :func:`~smoothtransfer.smoothing.runner.certify_dataset` itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smoothtransfer.data.datasets import get_dataset
from smoothtransfer.data.subsets import evenly_spaced
from smoothtransfer.errors import UserError
from smoothtransfer.evaluation.metrics import radius_grid
from smoothtransfer.job_configs import CertifyConfig, PredictConfig, parse_shard, parse_workers
from smoothtransfer.models.checkpoint import load_classifier
from smoothtransfer.models.external import parse_source
from smoothtransfer.reporting.tables import DEFAULT_RADII, certified_table, markdown_table
from smoothtransfer.smoothing.results import load_run, merge_shards
from smoothtransfer.smoothing.runner import certify_dataset, predict_dataset
from smoothtransfer.smoothing.sampling import (
    auto_batch_size,
    compile_for_inference,
    default_batch_size,
    prepare_for_inference,
)
from smoothtransfer.smoothing.sequential import certify_sequential
from smoothtransfer.smoothing.stats import max_certifiable_radius
from smoothtransfer.smoothing.workers import cpu_workers_available
from smoothtransfer.utils import AMP_DTYPES, auto_amp, resolve_device

CHECKPOINT_STEMS = ("checkpoint", "best", "last", "model", "final")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(text: str | int, device: torch.device, num_images: int) -> int:
    """Worker processes for this run: the explicit number, or on CPU one per available core (at most one per
    image, and 1 where processes cannot be forked); always 1 on GPUs."""
    w = parse_workers(text)
    if w is not None:
        return w
    if device.type != "cpu" or not cpu_workers_available():
        return 1
    return max(1, min(available_cores(), num_images))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def torchrun_shard(cfg: Any) -> tuple[int, int] | None:
    """The shard of this process (``cfg.shard``: ``"K/NUM"``): that shard, else ``(RANK, WORLD_SIZE)`` under
    torchrun, else None."""
    shard = parse_shard(cfg.shard)
    if shard is not None or _world_size() <= 1:
        return shard
    return int(os.environ.get("RANK", "0")), _world_size()


def _device_name(cfg: PredictConfig) -> str:
    """``cfg.device``; ``auto`` under torchrun with GPUs is this rank's GPU (``LOCAL_RANK``)."""
    if cfg.device == "auto" and cfg.shard is None and _world_size() > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return cfg.device


def finish_shards(out: Path, shard: tuple[int, int] | None, mode: str) -> dict[str, Any] | None:
    """After a sharded run: under torchrun wait for every rank, then rank 0 merges; a manual ``--shard``
    process merges if it finished last. Returns the merged summary (None on other ranks / unsharded)."""
    if shard is None:
        return None
    if _world_size() > 1:
        # only under torchrun: the process group helpers live with the trainer (train imports this layer)
        from smoothtransfer.train.distributed import barrier, cleanup, init_distributed

        info = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        barrier(info)
        is_main = info.is_main
        cleanup(info)
        if not is_main:
            return None
    return merge_shards(out, mode)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_out(command: str, checkpoint: str, dataset: str, split: str) -> Path:
    stem = Path(checkpoint).stem if Path(checkpoint).suffix else Path(checkpoint).name
    if stem in CHECKPOINT_STEMS:  # name the run after its directory
        stem = f"{Path(checkpoint).resolve().parent.name}-{stem}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{dataset}-{split}").strip("_")
    return Path("runs") / command / safe


@dataclass
class SmoothingInputs:
    """Everything a certify/predict run works on, loaded and cross-checked: ``model`` (an ``nn.Module``, or
    ``sigma -> nn.Module`` with a denoiser), the dataset and selected ``indices``, the resolved ``batch_size``
    and ``skip``, ``out`` and the facts recorded in the sidecars (``identity`` must match on resume)."""

    model: Any
    dataset: Any
    indices: list[int]
    device: torch.device
    amp_dtype: torch.dtype | None
    num_classes: int
    batch_size: int
    skip: int
    out: Path
    identity: dict[str, Any]
    info: dict[str, Any]


def load_inputs(cfg: PredictConfig, command: str, device_name: str | None = None) -> SmoothingInputs:
    """Load and cross-check the checkpoint, dataset and denoiser of ``cfg``; nothing is written."""
    device = resolve_device(device_name or cfg.device)
    amp = auto_amp(device) if cfg.amp == "auto" else cfg.amp  # what auto resolved to lands in the sidecar
    amp_dtype = AMP_DTYPES[amp]
    denoiser_mod = None
    if cfg.denoiser:
        try:
            from smoothtransfer.models import denoisers as denoiser_mod  # the [diffusion] extra may be absent
        except ImportError:
            raise UserError("--denoiser: denoised smoothing is not available in this installation") from None

    external = parse_source(cfg.checkpoint)  # cohen:FILE, hf-hub:ORG/NAME, ... (None: our checkpoint)
    ckpt_path = Path(cfg.checkpoint)
    if external is None and not ckpt_path.exists():
        raise UserError(f"checkpoint {ckpt_path} does not exist")
    classifier, ckpt = load_classifier(str(external or ckpt_path), device=device)
    prepare_for_inference(classifier)  # eval + channels_last (measured faster on CPU and GPU)
    spec = dict(getattr(classifier, "spec", None) or ckpt.get("model_spec") or {})
    batch_size = cfg.batch_size
    if batch_size is None and device.type != "cuda":
        batch_size = default_batch_size(device, int(spec.get("input_size") or 32))
    num_classes = int(spec.get("num_classes") or len(ckpt.get("classes") or []))

    dataset = get_dataset(cfg.dataset, cfg.split, root=cfg.data_root)
    ds_classes = list(dataset.classes)
    if num_classes != len(ds_classes):
        raise UserError(f"checkpoint has {num_classes} classes but dataset {cfg.dataset} ({cfg.split}) has "
                        f"{len(ds_classes)}")
    ck_classes = ckpt.get("classes")
    if ck_classes and list(ck_classes) != ds_classes:
        diff = next(i for i, (a, b) in enumerate(zip(ck_classes, ds_classes)) if a != b)
        raise UserError(f"checkpoint classes differ from dataset {cfg.dataset}'s: class {diff} is "
                        f"'{ck_classes[diff]}' in the checkpoint but '{ds_classes[diff]}' in the dataset")
    shape = tuple(dataset.images.shape[1:]) if hasattr(dataset, "images") else tuple(dataset[0][0].shape)
    want = (int(spec.get("in_chans", shape[0])), int(spec.get("input_size", shape[1])),
            int(spec.get("input_size", shape[2])))
    if shape != want and not (spec.get("resizes_input") and shape[0] == want[0]):  # timm: resizes any size
        raise UserError(f"dataset {cfg.dataset} has {shape[0]}x{shape[1]}x{shape[2]} images but the checkpoint's "
                        f"model takes {want[0]}x{want[1]}x{want[2]}")

    if batch_size is None:
        # On a GPU: sized from the memory free now, by one probe pass (before compiling: no extra graph).
        batch_size = auto_batch_size(classifier, shape, device, amp_dtype)
        if cfg.denoiser:
            batch_size = max(1, batch_size // 4)  # the denoiser's activations come on top
    if cfg.compile:
        classifier = compile_for_inference(classifier)
    model: Any = classifier
    if denoiser_mod is not None:
        denoiser = denoiser_mod.load_denoiser(cfg.denoiser, device)
        # Built now so that a σ outside the denoiser's range fails before any work.
        per_sigma = {s: denoiser_mod.DenoisedClassifier(denoiser, classifier, s) for s in cfg.sigmas}
        model = per_sigma.__getitem__

    skip = cfg.skip
    if skip is None:
        # ImageFolder splits are sorted by class: --max alone would take the first classes only.
        skip = max(1, len(dataset) // cfg.max) if cfg.max and cfg.max > 0 else 1
    indices = evenly_spaced(len(dataset), skip, cfg.max)
    if not indices:
        raise UserError(f"--skip {skip} --max {cfg.max} select no images of {cfg.dataset} ({cfg.split})")
    out = Path(cfg.out) if cfg.out else default_out(command, external.run_name if external else cfg.checkpoint,
                                                    cfg.dataset, cfg.split)
    identity = {
        "checkpoint_sha256": ckpt["identity"] if external else file_sha256(ckpt_path) if ckpt_path.is_file()
        else str(ckpt_path.resolve()),
        "dataset": cfg.dataset,
        "split": cfg.split,
        "denoiser": str(Path(cfg.denoiser).resolve()) if cfg.denoiser else None,
    }
    info = {
        "checkpoint": str(external) if external else str(ckpt_path.resolve()),
        "checkpoint_dataset": ckpt.get("dataset"),
        "model_arch": spec.get("arch"),
        "skip": skip,
        "max": cfg.max,
        "data_root": cfg.data_root,
        "command_line": " ".join(["smoothtransfer", *sys.argv[1:]]) if sys.argv else None,
    }
    return SmoothingInputs(model=model, dataset=dataset, indices=indices, device=device, amp_dtype=amp_dtype,
                           num_classes=num_classes, batch_size=batch_size, skip=skip, out=out, identity=identity,
                           info=info)


def _sequential_certify_fn(cfg: CertifyConfig, batch_size: int):
    """``certify_fn`` for the runner: :func:`certify_sequential` on the radius grid."""
    grids: dict[float, list[float]] = {}

    def certify_fn(smooth, x, generator):
        grid = cfg.radius_grid or grids.setdefault(
            smooth.sigma, radius_grid(float(max_certifiable_radius(smooth.sigma, cfg.n, cfg.alpha))))
        return certify_sequential(smooth, x, cfg.n0, cfg.n, cfg.alpha, batch_size, list(grid), generator=generator)

    return certify_fn


@dataclass
class CertifyResult:
    """What :func:`certify_run` / :func:`predict_run` wrote: the result directory ``out``, its summary
    (``summary.json`` / ``predict_summary.json`` contents, every σ in the directory) and the σ of this run."""

    out: Path
    summary: dict[str, Any]
    sigmas: tuple[float, ...]
    mode: str = "certify"
    entries: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        wanted = {float(s) for s in self.sigmas}
        self.entries = [e for e in self.summary["sigmas"] if e["sigma"] in wanted]

    def table(self) -> str:
        """certify: the ``(clean)certified`` markdown table and one line per σ (clean accuracy, ACR, abstain
        rate, speed); predict: accuracy and abstain rate per σ. What the command prints."""
        if self.mode == "predict":
            rows = [{"σ": e["sigma"], "N": e["n"], "α": e["alpha"], "images": e["num_done"],
                     "accuracy %": f"{100 * e['accuracy']:.1f}", "abstain %": f"{100 * e['abstain_rate']:.1f}",
                     "images/s": f"{e['images_per_s']:.3g}"} for e in self.entries]
            return markdown_table(rows, ["σ", "N", "α", "images", "accuracy %", "abstain %", "images/s"])
        run_ = load_run(self.out)
        wanted = {float(s) for s in self.sigmas}
        run_.results = [r for r in run_.results if r.sigma in wanted]
        lines = [certified_table([run_], DEFAULT_RADII)]
        lines += [f"σ={e['sigma']:g}: clean {100 * e['clean_accuracy']:.1f}%, ACR {e['acr']:.3f}, abstain "
                  f"{100 * e['abstain_rate']:.1f}%, {e['images_per_s']:.3g} images/s, "
                  f"{e['samples_per_s']:.3g} samples/s (N={e['n']}, n0={e['n0']}, α={e['alpha']:g})\n"
                  for e in self.entries]
        return "".join(lines)


def certify_run(cfg: CertifyConfig) -> CertifyResult:
    """CERTIFY every selected image of ``cfg.dataset`` at each σ with the checkpoint's smoothed classifier (or
    the sequential test, ``sequential=True``); resumes a partial run in ``out``. See the module docstring."""
    cfg = cfg.validate()
    shard = torchrun_shard(cfg)
    ctx = load_inputs(cfg, "certify", _device_name(cfg))
    if cfg.sequential:
        ctx.identity["radius_grid"] = (list(cfg.radius_grid) if cfg.radius_grid
                                       else "0.25 steps up to max_certifiable_radius(sigma, n, alpha)")
    summary = certify_dataset(
        ctx.model, ctx.dataset, sigmas=cfg.sigmas, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
        batch_size=ctx.batch_size, out_dir=ctx.out, indices=ctx.indices, seed=cfg.seed, device=ctx.device,
        num_classes=ctx.num_classes, progress=cfg.progress, amp_dtype=ctx.amp_dtype,
        certify_fn=_sequential_certify_fn(cfg, ctx.batch_size) if cfg.sequential else None,
        certifier="sequential" if cfg.sequential else "cohen", identity=ctx.identity, info=ctx.info,
        overwrite=cfg.overwrite, shard=shard, workers=resolve_workers(cfg.workers, ctx.device, len(ctx.indices)),
        pack=cfg.pack,
    )
    summary = finish_shards(ctx.out, shard, "certify") or summary
    return CertifyResult(ctx.out, summary, cfg.sigmas)


def predict_run(cfg: PredictConfig) -> CertifyResult:
    """PREDICT every selected image at each σ: ``predict_sigma_<σ>.tsv`` (``idx label predict correct time``),
    sidecars and ``predict_summary.json`` (accuracy and abstain rate per σ); resumable like certify."""
    cfg = cfg.validate()
    shard = torchrun_shard(cfg)
    ctx = load_inputs(cfg, "predict", _device_name(cfg))
    summary = predict_dataset(
        ctx.model, ctx.dataset, sigmas=cfg.sigmas, n=cfg.n, alpha=cfg.alpha, batch_size=ctx.batch_size,
        out_dir=ctx.out, indices=ctx.indices, seed=cfg.seed, device=ctx.device, num_classes=ctx.num_classes,
        progress=cfg.progress, amp_dtype=ctx.amp_dtype, identity=ctx.identity, info=ctx.info,
        overwrite=cfg.overwrite, shard=shard, workers=resolve_workers(cfg.workers, ctx.device, len(ctx.indices)),
        pack=cfg.pack,
    )
    summary = finish_shards(ctx.out, shard, "predict") or summary
    return CertifyResult(ctx.out, summary, cfg.sigmas, mode="predict")
