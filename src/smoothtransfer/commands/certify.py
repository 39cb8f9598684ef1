"""``smoothtransfer certify``: CERTIFY a dataset with the smoothed classifier at one or more noise levels.

Writes ``OUT/sigma_<σ>.tsv`` (Cohen et al.'s columns + ``count``, ``p_lower``), ``sigma_<σ>.json`` sidecars and
``summary.json`` (see :mod:`smoothtransfer.smoothing.runner`), then prints a ``(clean)certified`` table.
Every argument, the checkpoint, the dataset and any existing results in ``OUT`` are checked before any work;
rerunning the same command after an interruption resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from pathlib import Path
from typing import Any

from smoothtransfer.errors import UserError

HELP = "CERTIFY a dataset with the smoothed classifier (Cohen et al.), several σ at once"
AMP_DTYPES = {"none": None, "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------- shared with predict


def add_common_arguments(p: argparse.ArgumentParser, *, n_default: int, batch_default: int) -> None:
    """Flags shared by ``certify`` and ``predict``."""
    p.add_argument("--checkpoint", required=True,
                   help="classifier checkpoint (.pt) saved by pretrain/finetune, or a model trained elsewhere: "
                        "cohen:FILE, consistency:FILE, catrs:FILE, smoothadv:FILE, smoothadv-center:FILE, macer:FILE "
                        "(the reference implementations' checkpoints), timm:NAME, hf-hub:ORG/NAME, local-dir:DIR "
                        "(timm classifiers; their resize and mean/std become part of the base classifier)")
    p.add_argument("--dataset", required=True,
                   help="cifar10, tiny-imagenet-32, eurosat-32, imagefolder:<dir or .zip>, torchvision-cifar10, ...")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA)")
    p.add_argument("--sigma", type=float, nargs="+", required=True, metavar="σ",
                   help="noise level(s) in [0,1] pixel units; each is certified and reported separately")
    # --N / --N0 are Cohen et al.'s spellings; under torchrun they are needed, since torchrun's own parser
    # rejects a bare --n as an ambiguous abbreviation of its --nnodes / --nproc-per-node / --node-rank.
    p.add_argument("--n", "--N", dest="n", type=int, default=n_default,
                   help=f"noise samples per image (default: {n_default}); --N under torchrun")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default: 0.001)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="noisy samples per forward pass (default: measured best for the device: 128 on CPU, "
                        "1000 on GPU at 32 px)")
    p.add_argument("--skip", type=int, default=None,
                   help="use every SKIP-th image (Cohen's --skip; default: 1, or spread over the whole split when "
                        "--max is given, since our test splits are sorted by class)")
    p.add_argument("--max", type=int, default=-1, help="at most MAX images after --skip (default: -1 = all)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; image i uses a generator seeded by (seed, σ, i)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none",
                   help="run the base classifier in bf16/fp16 autocast (noise is still added in float32)")
    p.add_argument("--denoiser", default=None,
                   help="denoiser directory: certify denoiser+classifier (denoised smoothing)")
    p.add_argument("--out", default=None, help="result directory (default: runs/<command>/<checkpoint>-<dataset>-<split>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing results for these σ in --out instead of resuming them")
    p.add_argument("--shard", default=None, metavar="K/NUM",
                   help="certify only the K-th of NUM interleaved parts of the selected images (0-based), e.g. one "
                        "process per GPU with the same --out; summary.json and report merge the shards")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the base classifier (pays off for large N; first call compiles)")
    p.add_argument("--workers", default="auto", metavar="W",
                   help="CPU: certify W images at a time in W single-threaded worker processes (default auto: "
                        "one per available core; 1 on GPUs, where torchrun runs one process per GPU). "
                        "Results do not depend on it")
    p.add_argument("--pack", type=int, default=None, metavar="K",
                   help="images whose noisy copies share forward batches (default: batch size // n0, at most "
                        "64; results do not depend on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def validate_numbers(args: argparse.Namespace, n0: int | None) -> None:
    """The numeric arguments, before anything is loaded."""
    for s in args.sigma:
        if not (math.isfinite(s) and s > 0):
            raise UserError(f"--sigma must be > 0, got {s:g}")
        from smoothtransfer.smoothing.smooth import sigma_too_small

        if sigma_too_small(s):
            raise UserError(sigma_too_small(s))
    if len(set(args.sigma)) != len(args.sigma):
        raise UserError(f"--sigma lists a noise level twice: {' '.join(f'{s:g}' for s in args.sigma)}")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if n0 is not None:
        if n0 < 1:
            raise UserError(f"--n0 must be >= 1, got {n0}")
        if n0 > args.n:
            raise UserError(f"--n0 ({n0}) must not exceed --n ({args.n})")
    if not (0.0 < args.alpha < 1.0):
        raise UserError(f"--alpha must lie strictly between 0 and 1, got {args.alpha:g}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    parse_workers(args.workers)
    if args.pack is not None and args.pack < 1:
        raise UserError(f"--pack must be >= 1, got {args.pack}")
    if args.skip is not None and args.skip < 1:
        raise UserError(f"--skip must be >= 1, got {args.skip}")
    if args.max < -1:
        raise UserError(f"--max must be >= 0, or -1 for all images, got {args.max}")
    parse_shard(args.shard)


def parse_workers(text: str | int) -> int | None:
    """``--workers``: a positive integer, or ``auto`` (None: decided from the device)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        w = int(text)
        if w < 1:
            raise UserError(f"--workers must be >= 1 or 'auto', got {w}")
        return w
    if str(text).strip().lower() == "auto":
        return None
    raise UserError(f"--workers must be a positive integer or 'auto', got '{text}'")


def available_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(text: str | int, device, num_images: int) -> int:
    """Worker processes for this run: the explicit number, or on CPU one per available core (at most one per
    image, and 1 where processes cannot be forked); always 1 on GPUs."""
    from smoothtransfer.smoothing.runner import cpu_workers_available

    w = parse_workers(text)
    if w is not None:
        return w
    if device.type != "cpu" or not cpu_workers_available():
        return 1
    return max(1, min(available_cores(), num_images))


def torchrun_shard(args: argparse.Namespace) -> tuple[int, int] | None:
    """The shard of this process: ``--shard K/NUM``, else ``(RANK, WORLD_SIZE)`` under torchrun, else None."""
    import os

    shard = parse_shard(args.shard)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if shard is not None or world <= 1:
        return shard
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "auto":
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return rank, world


def finish_shards(out: Path, shard: tuple[int, int] | None, mode: str) -> dict[str, Any] | None:
    """After a sharded run: under torchrun wait for every rank, then rank 0 merges; a manual ``--shard``
    process merges if it finished last. Returns the merged summary (None on other ranks / unsharded)."""
    import os

    if shard is None:
        return None
    from smoothtransfer.smoothing.runner import merge_shards

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import torch

        from smoothtransfer.train.distributed import barrier, cleanup, init_distributed

        info = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        barrier(info)
        is_main = info.is_main
        cleanup(info)
        if not is_main:
            return None
    return merge_shards(out, mode)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/NUM"`` -> ``(K, NUM)`` with ``0 <= K < NUM``; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard must be K/NUM with 0 <= K < NUM (e.g. 0/4), got '{text}'")
    return int(m.group(1)), int(m.group(2))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_out(command: str, checkpoint: str, dataset: str, split: str) -> Path:
    stem = Path(checkpoint).stem if Path(checkpoint).suffix else Path(checkpoint).name
    if stem in ("checkpoint", "best", "last", "model", "final"):  # name the run after its directory
        stem = f"{Path(checkpoint).resolve().parent.name}-{stem}"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{dataset}-{split}").strip("_")
    return Path("runs") / command / safe


def prepare(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Load and cross-check the checkpoint, dataset and denoiser; nothing is written.

    Returns a dict with ``model`` (an ``nn.Module``, or ``sigma -> nn.Module`` with a denoiser), ``dataset``,
    ``indices``, ``device``, ``amp_dtype``, ``num_classes``, ``out``, ``identity`` and ``info``.
    """
    import torch

    from smoothtransfer.data.datasets import get_dataset
    from smoothtransfer.data.subsets import evenly_spaced
    from smoothtransfer.utils import resolve_device

    device = resolve_device(args.device)
    amp_dtype = getattr(torch, AMP_DTYPES[args.amp]) if AMP_DTYPES[args.amp] else None

    denoiser_mod = None
    if args.denoiser:
        try:
            from smoothtransfer.models import denoisers as denoiser_mod
        except ImportError:
            raise UserError("--denoiser: denoised smoothing is not available in this installation") from None

    from smoothtransfer.models.external import parse_source

    external = parse_source(args.checkpoint)  # cohen:FILE, hf-hub:ORG/NAME, ... (None: our checkpoint)
    ckpt_path = Path(args.checkpoint)
    if external is None and not ckpt_path.exists():
        raise UserError(f"checkpoint {ckpt_path} does not exist")
    try:
        from smoothtransfer.models.checkpoint import load_classifier
    except ImportError:
        raise UserError("loading checkpoints is not available in this installation (smoothtransfer.train)") from None
    classifier, ckpt = load_classifier(str(external or ckpt_path), device=device)
    from smoothtransfer.smoothing.sampling import default_batch_size, prepare_for_inference

    prepare_for_inference(classifier)  # eval + channels_last (measured faster on CPU and GPU)
    spec = dict(getattr(classifier, "spec", None) or ckpt.get("model_spec") or {})
    if args.batch_size is None and device.type != "cuda":
        args.batch_size = default_batch_size(device, int(spec.get("input_size") or 32))
    num_classes = int(spec.get("num_classes") or len(ckpt.get("classes") or []))

    dataset = get_dataset(args.dataset, args.split, root=args.data_root)
    ds_classes = list(dataset.classes)
    if num_classes != len(ds_classes):
        raise UserError(f"checkpoint has {num_classes} classes but dataset {args.dataset} ({args.split}) has "
                        f"{len(ds_classes)}")
    ck_classes = ckpt.get("classes")
    if ck_classes and list(ck_classes) != ds_classes:
        diff = next(i for i, (a, b) in enumerate(zip(ck_classes, ds_classes)) if a != b)
        raise UserError(f"checkpoint classes differ from dataset {args.dataset}'s: class {diff} is "
                        f"'{ck_classes[diff]}' in the checkpoint but '{ds_classes[diff]}' in the dataset")
    shape = tuple(dataset.images.shape[1:]) if hasattr(dataset, "images") else tuple(dataset[0][0].shape)
    want = (int(spec.get("in_chans", shape[0])), int(spec.get("input_size", shape[1])),
            int(spec.get("input_size", shape[2])))
    if shape != want and not (spec.get("resizes_input") and shape[0] == want[0]):  # timm: resizes any size
        raise UserError(f"dataset {args.dataset} has {shape[0]}x{shape[1]}x{shape[2]} images but the checkpoint's "
                        f"model takes {want[0]}x{want[1]}x{want[2]}")

    if args.batch_size is None:
        # On a GPU: sized from the memory free now, by one probe pass (before compiling: no extra graph).
        from smoothtransfer.smoothing.sampling import auto_batch_size

        args.batch_size = auto_batch_size(classifier, shape, device, amp_dtype)
        if args.denoiser:
            args.batch_size = max(1, args.batch_size // 4)  # the denoiser's activations come on top
    if getattr(args, "compile", False):
        from smoothtransfer.smoothing.sampling import compile_for_inference

        classifier = compile_for_inference(classifier)
    model: Any = classifier
    if denoiser_mod is not None:
        denoiser = denoiser_mod.load_denoiser(args.denoiser, device)
        # Built now so that a σ outside the denoiser's range fails before any work.
        per_sigma = {s: denoiser_mod.DenoisedClassifier(denoiser, classifier, s) for s in args.sigma}
        model = per_sigma.__getitem__

    if args.skip is None:
        # ImageFolder splits are sorted by class: --max alone would take the first classes only.
        args.skip = max(1, len(dataset) // args.max) if args.max and args.max > 0 else 1
    indices = evenly_spaced(len(dataset), args.skip, args.max)
    if not indices:
        raise UserError(f"--skip {args.skip} --max {args.max} select no images of {args.dataset} ({args.split})")
    out = Path(args.out) if args.out else default_out(command, external.run_name if external else args.checkpoint,
                                                      args.dataset, args.split)
    identity = {
        "checkpoint_sha256": ckpt["identity"] if external else file_sha256(ckpt_path) if ckpt_path.is_file()
        else str(ckpt_path.resolve()),
        "dataset": args.dataset,
        "split": args.split,
        "denoiser": str(Path(args.denoiser).resolve()) if args.denoiser else None,
    }
    info = {
        "checkpoint": str(external) if external else str(ckpt_path.resolve()),
        "checkpoint_dataset": ckpt.get("dataset"),
        "model_arch": spec.get("arch"),
        "skip": args.skip,
        "max": args.max,
        "data_root": args.data_root,
        "command_line": " ".join(["smoothtransfer", *sys.argv[1:]]) if sys.argv else None,
    }
    return {"model": model, "dataset": dataset, "indices": indices, "device": device, "amp_dtype": amp_dtype,
            "num_classes": num_classes, "out": out, "identity": identity, "info": info}


# ------------------------------------------------------------------------------------------------ certify


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, n_default=100_000, batch_default=400)
    p.add_argument("--n0", "--N0", dest="n0", type=int, default=100, help="selection samples per image (default: 100)")
    p.add_argument("--sequential", action="store_true",
                   help="sample-saving sequential certification on a grid of radii (anytime-valid, alpha split "
                        "over stages; stops drawing once every grid radius is decided; --n is the maximum)")
    p.add_argument("--radius-grid", type=float, nargs="+", default=None, metavar="R",
                   help="with --sequential: the radii to decide (default: 0, 0.25, ... up to the largest radius "
                        "--n samples can certify at each σ)")


def _sequential_certify_fn(args: argparse.Namespace):
    """``certify_fn`` for the runner: :func:`smoothing.sequential.certify_sequential` on the radius grid."""
    try:
        from smoothtransfer.smoothing.sequential import certify_sequential
    except ImportError:
        raise UserError("--sequential: sequential certification is not available in this installation") from None
    from smoothtransfer.evaluation.metrics import radius_grid
    from smoothtransfer.smoothing.stats import max_certifiable_radius

    grids: dict[float, list[float]] = {}

    def certify_fn(smooth, x, generator):
        grid = args.radius_grid or grids.setdefault(
            smooth.sigma, radius_grid(float(max_certifiable_radius(smooth.sigma, args.n, args.alpha))))
        return certify_sequential(smooth, x, args.n0, args.n, args.alpha, args.batch_size, grid,
                                  generator=generator)

    return certify_fn


def _check_sequential_args(args: argparse.Namespace) -> None:
    if args.radius_grid is None:
        return
    if not args.sequential:
        raise UserError("--radius-grid only applies with --sequential")
    grid = args.radius_grid
    if any(not (math.isfinite(r) and r >= 0) for r in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise UserError(f"--radius-grid must be >= 0 and strictly increasing, got {' '.join(f'{r:g}' for r in grid)}")


def run(args: argparse.Namespace) -> int:
    from smoothtransfer.reporting.tables import DEFAULT_RADII, certified_table, load_run
    from smoothtransfer.smoothing.runner import certify_dataset

    validate_numbers(args, args.n0)
    _check_sequential_args(args)
    certify_fn = _sequential_certify_fn(args) if args.sequential else None
    shard = torchrun_shard(args)
    ctx = prepare(args, "certify")
    if args.sequential:
        ctx["identity"]["radius_grid"] = args.radius_grid or "0.25 steps up to max_certifiable_radius(sigma, n, alpha)"
    workers = resolve_workers(args.workers, ctx["device"], len(ctx["indices"]))
    summary = certify_dataset(
        ctx["model"], ctx["dataset"], sigmas=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
        batch_size=args.batch_size, out_dir=ctx["out"], indices=ctx["indices"], seed=args.seed,
        device=ctx["device"], num_classes=ctx["num_classes"], progress=not args.no_progress,
        amp_dtype=ctx["amp_dtype"], certify_fn=certify_fn, certifier="sequential" if args.sequential else "cohen",
        identity=ctx["identity"], info=ctx["info"], overwrite=args.overwrite, shard=shard,
        workers=workers, pack=args.pack,
    )
    summary = finish_shards(ctx["out"], shard, "certify") or summary
    run_ = load_run(ctx["out"])
    wanted = {float(s) for s in args.sigma}
    run_.results = [r for r in run_.results if r.sigma in wanted]
    print(certified_table([run_], DEFAULT_RADII), end="")
    for e in summary["sigmas"]:
        if e["sigma"] in wanted:
            print(f"σ={e['sigma']:g}: clean {100 * e['clean_accuracy']:.1f}%, ACR {e['acr']:.3f}, abstain "
                  f"{100 * e['abstain_rate']:.1f}%, {e['images_per_s']:.3g} images/s, "
                  f"{e['samples_per_s']:.3g} samples/s (N={e['n']}, n0={e['n0']}, α={e['alpha']:g})")
    print(f"results: {ctx['out']}/ (summary.json, sigma_*.tsv); report: smoothtransfer report {ctx['out']}")
    return 0
