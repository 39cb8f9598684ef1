"""Typed configs of every job other than training (:class:`~smoothtransfer.config.TrainConfig`): certify,
predict, attack, noise profile, denoiser training and report.

Each is a frozen dataclass whose fields carry their command-line flag (spelling, help, choices), so a command
is argparse → config → one library call (``smoothtransfer.commands._flags`` builds the parser from the
fields), and Python code builds the same config::

    from smoothtransfer.smoothing import CertifyConfig, certify_run
    result = certify_run(CertifyConfig(checkpoint="runs/ft/checkpoint.pt", dataset="cifar10", sigmas=(0.25,)))

``validate()`` checks every value before any work (UserError naming the key as its flag, e.g. ``--sigma``) and
returns the config to use. This module imports no torch, so ``smoothtransfer COMMAND --help`` stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from smoothtransfer.config import AMP_CHOICES, JobConfig, check_finite, opt
from smoothtransfer.errors import UserError, check

CHECKPOINT_HELP = ("classifier checkpoint (.pt) saved by pretrain/finetune, or a model trained elsewhere: cohen:FILE, "
                   "consistency:FILE, catrs:FILE, smoothadv:FILE, smoothadv-center:FILE, macer:FILE (the reference "
                   "implementations' checkpoints), timm:NAME, hf-hub:ORG/NAME, local-dir:DIR (timm classifiers; "
                   "their resize and mean/std become part of the base classifier)")
DATASET_HELP = "cifar10, tiny-imagenet-32, eurosat-32, imagefolder:<dir or .zip>, torchvision-cifar10, ..."
ATTACK_CHOICES = ("apgd-l2", "pgd-l2", "smoothed-pgd", "certificate-check")
SMOOTHED_ATTACKS = ("smoothed-pgd", "certificate-check")
DEFAULT_STEPS = {"apgd-l2": 100, "pgd-l2": 20, "smoothed-pgd": 20, "certificate-check": 20}
#: the noise levels of the noise profile (Table 2 of the robust-transfer study)
DEFAULT_NOISE_SIGMAS = (0.001, 0.01, 0.1, 0.25, 0.5, 1.0)
DENOISER_KINDS = ("diffusion", "mse")
SMOOTHED_GROUP = "smoothed classifier (smoothed-pgd, certificate-check)"


def parse_workers(text: str | int) -> int | None:
    """``--workers``: a positive integer, or ``auto`` (None: decided from the device)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        w = int(text)
        check(w >= 1, f"--workers must be >= 1 or 'auto', got {w}")
        return w
    if str(text).strip().lower() == "auto":
        return None
    raise UserError(f"--workers must be a positive integer or 'auto', got '{text}'")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/NUM"`` -> ``(K, NUM)`` with ``0 <= K < NUM``; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard must be K/NUM with 0 <= K < NUM (e.g. 0/4), got '{text}'")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------------------------ certify, predict


@dataclass(frozen=True, kw_only=True)
class PredictConfig(JobConfig):
    """PREDICT (Cohen et al.) over a dataset: ``OUT/predict_sigma_<σ>.tsv``, sidecars, ``predict_summary.json``."""

    checkpoint: str = opt(help=CHECKPOINT_HELP)
    dataset: str = opt(help=DATASET_HELP)
    split: str = opt("test", help="dataset split (default: test)")
    data_root: str | None = opt(None, help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA)")
    sigmas: tuple[float, ...] = opt(flags=("--sigma",), metavar="σ",
                                    help="noise level(s) in [0,1] pixel units; each is certified and reported "
                                         "separately")
    # --N is Cohen et al.'s spelling; under torchrun it is needed, since torchrun's own parser rejects a bare
    # --n as an ambiguous abbreviation of its --nnodes / --nproc-per-node / --node-rank.
    n: int = opt(100_000, flags=("--n", "--N"),
                 help="noise samples per image (default: 100000); --N under torchrun")
    alpha: float = opt(0.001, help="failure probability (default: 0.001)")
    batch_size: int | None = opt(None, help="noisy samples per forward pass (default: measured best for the "
                                            "device: 128 on CPU, 1000 on GPU at 32 px)")
    skip: int | None = opt(None, help="use every SKIP-th image (Cohen's --skip; default: 1, or spread over the "
                                      "whole split when --max is given, since our test splits are sorted by class)")
    max: int = opt(-1, help="at most MAX images after --skip (default: -1 = all)")
    seed: int = opt(0, help="noise seed; image i uses a generator seeded by (seed, σ, i)")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    amp: str = opt("none", choices=AMP_CHOICES,
                   help="run the base classifier in bf16/fp16 autocast (noise is still added in float32); auto: "
                        "bf16 on CUDA and on CPUs with AMX, fp32 elsewhere (the result files record which)")
    denoiser: str | None = opt(None, help="denoiser directory: certify denoiser+classifier (denoised smoothing)")
    out: str | None = opt(None, help="result directory (default: runs/<command>/<checkpoint>-<dataset>-<split>)")
    overwrite: bool = opt(False, help="replace existing results for these σ in --out instead of resuming them")
    shard: str | None = opt(None, metavar="K/NUM",
                            help="certify only the K-th of NUM interleaved parts of the selected images (0-based), "
                                 "e.g. one process per GPU with the same --out; summary.json and report merge the "
                                 "shards")
    compile: bool = opt(False, help="torch.compile the base classifier (pays off for large N; first call compiles)")
    workers: str | int = opt("auto", metavar="W", argtype=str,
                             help="CPU: certify W images at a time in W single-threaded worker processes (default "
                                  "auto: one per available core; 1 on GPUs, where torchrun runs one process per "
                                  "GPU). Results do not depend on it")
    pack: int | None = opt(None, metavar="K",
                           help="images whose noisy copies share forward batches (default: batch size // n0, at "
                                "most 64; results do not depend on it)")
    progress: bool = opt(True, flags=("--no-progress",), help="no progress bar")

    def validate(self) -> PredictConfig:
        """The numeric settings, before anything is loaded."""
        from smoothtransfer.smoothing.smooth import sigma_too_small  # torch: only when a job is validated

        check(len(self.sigmas) > 0, "--sigma needs at least one noise level")
        for s in self.sigmas:
            check_finite(s, "--sigma")
            check(not sigma_too_small(s), sigma_too_small(s) or "")
        check(len(set(self.sigmas)) == len(self.sigmas),
              f"--sigma lists a noise level twice: {' '.join(f'{s:g}' for s in self.sigmas)}")
        check(self.n >= 1, f"--n must be >= 1, got {self.n}")
        self._check_n0()
        check(0.0 < self.alpha < 1.0, f"--alpha must lie strictly between 0 and 1, got {self.alpha:g}")
        check(self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        parse_workers(self.workers)
        check(self.pack is None or self.pack >= 1, f"--pack must be >= 1, got {self.pack}")
        check(self.skip is None or self.skip >= 1, f"--skip must be >= 1, got {self.skip}")
        check(self.max >= -1, f"--max must be >= 0, or -1 for all images, got {self.max}")
        parse_shard(self.shard)
        return self

    def _check_n0(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class CertifyConfig(PredictConfig):
    """CERTIFY (Cohen et al.) over a dataset at one or more σ: ``OUT/sigma_<σ>.tsv`` (Cohen's columns + ``count``,
    ``p_lower``), ``sigma_<σ>.json`` sidecars and ``summary.json``; resumable."""

    n0: int = opt(100, flags=("--n0", "--N0"), help="selection samples per image (default: 100)")
    sequential: bool = opt(False, help="sample-saving sequential certification on a grid of radii (anytime-valid, "
                                       "alpha split over stages; stops drawing once every grid radius is decided; "
                                       "--n is the maximum)")
    radius_grid: tuple[float, ...] | None = opt(None, metavar="R",
                                                help="with --sequential: the radii to decide (default: 0, 0.25, ... "
                                                     "up to the largest radius --n samples can certify at each σ)")

    def _check_n0(self) -> None:
        check(self.n0 >= 1, f"--n0 must be >= 1, got {self.n0}")
        check(self.n0 <= self.n, f"--n0 ({self.n0}) must not exceed --n ({self.n})")

    def validate(self) -> CertifyConfig:
        super().validate()
        grid = self.radius_grid
        if grid is not None:
            check(self.sequential, "--radius-grid only applies with --sequential")
            ok = all(math.isfinite(r) and r >= 0 for r in grid) and all(b > a for a, b in zip(grid, grid[1:]))
            check(ok, f"--radius-grid must be >= 0 and strictly increasing, got {' '.join(f'{r:g}' for r in grid)}")
        return self


# ------------------------------------------------------------------------------- attack, noise profile


@dataclass(frozen=True, kw_only=True)
class EvalDataConfig(JobConfig):
    """Checkpoint, dataset and image selection shared by ``attack`` and ``noise-profile``."""

    checkpoint: str = opt(help="classifier checkpoint (.pt) saved by pretrain/finetune, or cohen:FILE, macer:FILE, "
                               "hf-hub:ORG/NAME, local-dir:DIR, ... (models trained elsewhere; see certify --help)")
    dataset: str = opt(help=DATASET_HELP)
    split: str = opt("test", help="dataset split (default: test)")
    data_root: str | None = opt(None, help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA)")
    skip: int = opt(1, help="use every SKIP-th image (default: 1)")
    max: int = opt(-1, help="at most MAX images after --skip (default: -1 = all)")
    batch_size: int = opt(100, help="batch size (default: 100)")
    seed: int = opt(0, help="seed of random starts and noise (default: 0)")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    out: str | None = opt(None, help="result directory (default: runs/<command>/<checkpoint>-<dataset>)")
    overwrite: bool = opt(False, help="replace an existing result file in --out")

    def _validate_data(self) -> None:
        check(self.skip >= 1, f"--skip must be >= 1, got {self.skip}")
        check(self.max == -1 or self.max >= 1, f"--max must be >= 1, or -1 for all images, got {self.max}")
        check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class NoiseProfileConfig(EvalDataConfig):
    """Base-classifier accuracy under Gaussian noise at several σ: ``OUT/noise_profile.json``."""

    batch_size: int = opt(256, help="batch size (default: 256)")
    sigmas: tuple[float, ...] = opt(DEFAULT_NOISE_SIGMAS, metavar="σ",
                                    help="noise levels in [0,1] pixel units; 0 gives the clean accuracy (default: "
                                         f"{' '.join(f'{s:g}' for s in DEFAULT_NOISE_SIGMAS)})")

    def validate(self) -> NoiseProfileConfig:
        """Ranges checked; returns the config with duplicate σ removed (order kept)."""
        self._validate_data()
        check(len(self.sigmas) > 0, "give at least one noise level sigma")
        bad = [s for s in self.sigmas if not (math.isfinite(s) and s >= 0)]
        check(not bad, f"every sigma must be a finite number >= 0, got {bad[0] if bad else ''}")
        return self.replace(sigmas=tuple(dict.fromkeys(self.sigmas)))


@dataclass(frozen=True, kw_only=True)
class AttackConfig(EvalDataConfig):
    """Empirical L2 robustness: AutoPGD-L2 / PGD-L2 on the base classifier, the SmoothAdv attack on the smoothed
    classifier, or the certificate check: ``OUT/attack.json``."""

    attack: str = opt("apgd-l2", choices=ATTACK_CHOICES, help="attack (default: apgd-l2)")
    eps: float | None = opt(None, help="L2 radius in [0,1] pixel units (default: 0.5; certificate-check uses "
                                       "0.9 x each radius)")
    steps: int | None = opt(None, help="attack steps (default: 100 for apgd-l2, 20 otherwise)")
    restarts: int = opt(1, help="apgd-l2 random restarts (default: 1)")
    step_size: float | None = opt(None, help="pgd step size (default: 2.5 eps/steps; smoothed: 2 eps/steps)")
    sigma: float | None = opt(None, group=SMOOTHED_GROUP, help="smoothing noise level σ (required for these)")
    m: int = opt(16, group=SMOOTHED_GROUP, help="noise samples per attack step (default: 16)")
    n0: int = opt(100, group=SMOOTHED_GROUP, help="certificate-check: selection samples (default: 100)")
    n: int | None = opt(None, group=SMOOTHED_GROUP,
                        help="samples of PREDICT/CERTIFY (default: 1000 for smoothed-pgd, 10000 for the check)")
    alpha: float = opt(0.001, group=SMOOTHED_GROUP, help="failure probability (default: 0.001)")
    eps_fraction: float = opt(0.9, group=SMOOTHED_GROUP,
                              help="certificate-check: attack radius as a fraction of the certified radius "
                                   "(default: 0.9)")
    progress: bool = opt(True, flags=("--no-progress",), help="no progress bar")

    def validate(self) -> AttackConfig:
        """Every value, before anything is loaded; returns the config with the per-attack defaults filled in
        (``eps`` 0.5, ``steps`` from :data:`DEFAULT_STEPS`, ``n`` 1000 / 10000)."""
        self._validate_data()
        check(self.attack in ATTACK_CHOICES, f"--attack must be one of {', '.join(ATTACK_CHOICES)}, "
                                             f"got '{self.attack}'")
        eps = self.eps
        if self.attack == "certificate-check":
            check(eps is None, "--eps does not apply to certificate-check (it attacks at --eps-fraction x radius)")
            check(0 < self.eps_fraction < 1,
                  f"--eps-fraction must lie strictly between 0 and 1, got {self.eps_fraction:g}")
        else:
            eps = 0.5 if eps is None else eps
            check_finite(eps, "--eps")
        steps = DEFAULT_STEPS[self.attack] if self.steps is None else self.steps
        check(steps >= 1, f"--steps must be >= 1, got {steps}")
        check(self.restarts >= 1, f"--restarts must be >= 1, got {self.restarts}")
        if self.step_size is not None:
            check_finite(self.step_size, "--step-size")
        n = self.n
        if self.attack in SMOOTHED_ATTACKS:
            check(self.sigma is not None, f"--attack {self.attack} needs --sigma (the smoothing noise level)")
            check_finite(self.sigma, "--sigma")
            n = (1000 if self.attack == "smoothed-pgd" else 10_000) if n is None else n
            check(n >= 1 and self.n0 >= 1, f"--n and --n0 must be >= 1, got {n} and {self.n0}")
            check(self.m >= 1, f"--m must be >= 1, got {self.m}")
            check(0 < self.alpha < 1, f"--alpha must lie strictly between 0 and 1, got {self.alpha:g}")
        else:
            check(self.sigma is None,
                  f"--sigma only applies to smoothed-pgd and certificate-check, not {self.attack}")
        return self.replace(eps=eps, steps=steps, n=n)


# -------------------------------------------------------------------------------------- denoiser


@dataclass(frozen=True, kw_only=True)
class DenoiserConfig(JobConfig):
    """Train a denoiser for denoised smoothing: a DDPM UNet with the ε-prediction loss (``kind="diffusion"``,
    one-shot denoising) or a σ-conditioned DnCNN with the MSE loss (``kind="mse"``), written to ``out``
    (loadable with ``load_denoiser`` / ``certify --denoiser``)."""

    out: str = opt(help="output directory (loadable with load_denoiser / --denoiser)")
    kind: str = opt("diffusion", choices=DENOISER_KINDS,
                    help="diffusion: DDPM UNet (ε-prediction); mse: σ-conditioned DnCNN (MSE)")
    dataset: str = opt("cifar10", help="dataset name (cifar10, tiny-imagenet-32, ...)")
    data_root: str | None = opt(None, help="folder holding the datasets (default: $SMOOTHTRANSFER_DATA or "
                                           "../shared/datasets)")
    size: str = opt("tiny", help="diffusion: tiny | small | ddpm-cifar10 (Ho et al.'s 35.7M UNet); "
                                 "mse: tiny | small | dncnn")
    sigmas: tuple[float, ...] = opt((0.25, 0.5, 1.0), help="noise levels the MSE denoiser trains for (each image "
                                                           "draws one); unused for diffusion")
    epochs: int = opt(10, help="epochs (default: 10)")
    batch_size: int = opt(128, help="batch size (default: 128)")
    lr: float | None = opt(None, help="AdamW learning rate (default 2e-4 diffusion, 1e-3 mse)")
    weight_decay: float = opt(0.0, help="AdamW weight decay (default: 0)")
    grad_clip: float = opt(1.0, help="max gradient norm (0 disables)")
    max_train: int | None = opt(None, help="train on a fixed random subset of this many images")
    amp: str = opt("auto", choices=AMP_CHOICES,
                   help="autocast precision of training (auto: bf16 on CUDA and on CPUs with AMX-BF16, else none; "
                        "the PSNR measurement runs in float32)")
    compile: bool = opt(False, help="torch.compile the network for training (faster steps after a few minutes "
                                    "of compiling)")
    checkpoint_every: int = opt(200, help="also save OUT/checkpoint.pt every this many steps within an epoch, so "
                                          "an interrupted run loses at most that many (0: at epoch ends only; "
                                          "default: 200)")
    psnr_images: int = opt(500, help="when training ends, measure the denoiser's PSNR at each σ (diffusion: 0.25, "
                                     "0.5, 1.0; mse: --sigmas) on this many test images, evenly spaced, into "
                                     "OUT/psnr.json (0: skip; default: 500)")
    device: str = opt("auto", help="auto | cpu | cuda")
    seed: int = opt(0, help="seed (default: 0)")
    resume: bool = opt(False, help="continue from the last epoch saved in --out")
    progress: bool = opt(True, flags=("--no-progress",), help="no progress bar")

    def validate(self) -> DenoiserConfig:
        from smoothtransfer.models.denoisers import DIFFUSION_SIZES, MSE_SIZES  # torch: only when validated

        check(self.kind in DENOISER_KINDS, f"--kind must be diffusion or mse, got '{self.kind}'")
        sizes = DIFFUSION_SIZES if self.kind == "diffusion" else tuple(MSE_SIZES)
        check(self.size in sizes,
              f"--size {self.size} is not a {self.kind} denoiser size; choose from: {', '.join(sizes)}")
        check(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        check(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"--lr must be > 0, got {self.lr}")
        check(self.max_train is None or self.max_train >= 1, f"--max-train must be >= 1, got {self.max_train}")
        check(self.psnr_images >= 0, f"--psnr-images must be >= 0, got {self.psnr_images}")
        check(self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        check(self.kind != "mse" or (len(self.sigmas) > 0 and all(0 <= s < math.inf for s in self.sigmas)),
              f"--sigmas must be finite values >= 0, got {list(self.sigmas)}")
        return self


# ---------------------------------------------------------------------------------------- report


@dataclass(frozen=True, kw_only=True)
class ReportConfig(JobConfig):
    """A paper-style ``(clean)certified`` table and certified-accuracy curves from certify result directories:
    ``report.md`` and ``certified_accuracy.png`` in ``out`` (default: the first directory)."""

    dirs: tuple[str, ...] = opt(positional=True, metavar="DIR",
                                help="certify result directories (or result .tsv files)")
    radii: tuple[float, ...] = opt((0.25, 0.5, 0.75, 1.0),
                                   help="L2 radii of the table columns (default: 0.25 0.5 0.75 1.0)")
    names: tuple[str, ...] | None = opt(None, help="run names for the table/legend (default: folder names)")
    out: str | None = opt(None, help="where to write report.md and certified_accuracy.png (default: first DIR)")
    digits: int = opt(1, help="decimals of the percentages (default: 1)")
    max_radius: float | None = opt(None, help="x-axis limit of the plot (default: from the data)")
    title: str | None = opt(None, help="title of the report and plot")

    def validate(self) -> ReportConfig:
        check(len(self.dirs) > 0, "give at least one result directory")
        for r in self.radii:
            check_finite(r, "--radii", strict=False)
        check(self.names is None or len(self.names) == len(self.dirs),
              f"--names gives {len(self.names or ())} names for {len(self.dirs)} result directories")
        check(self.digits >= 0, f"--digits must be >= 0, got {self.digits}")
        if self.max_radius is not None:
            check_finite(self.max_radius, "--max-radius")
        return self
