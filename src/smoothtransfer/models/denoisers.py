"""Denoisers that turn an off-the-shelf classifier into a base classifier for randomized smoothing.

Two kinds, both ``forward(x_noisy (B,C,H,W), sigma) -> (B,C,H,W)`` clean estimate in [0,1]:

* :class:`DiffusionDenoiser` — one-shot denoising with an off-the-shelf DDPM (Carlini et al. 2023,
  "(Certified!!) Adversarial Robustness for Free!"; Jang et al. 2025, FT-CADIS, Algorithm 2): the noisy image
  is read as a diffusion state ``x_t`` at the timestep whose noise level matches σ, and ``x̂_0`` is predicted in
  one UNet call. UNet and noise schedule are diffusers' ``UNet2DModel`` and ``DDPMScheduler``.
* :class:`MSEDenoiser` — a σ-conditioned DnCNN trained with the MSE denoising loss (Salman et al. 2020,
  "Denoised Smoothing"; Zhang et al. 2017 for DnCNN).

:class:`DenoisedClassifier` composes a denoiser and a classifier into one base classifier ``f(D(x+δ))``: the
denoiser is part of the base classifier, so the certificate of the smoothed classifier covers it unchanged.

A saved denoiser is a directory with ``denoiser.json`` (``kind``, ``image_size``, ``channels``, ...) beside the
weights (diffusion: diffusers' ``unet/`` and ``scheduler/`` sub-directories; mse: ``model.safetensors``).
A ``smoothtransfer train-denoiser`` run directory holds the training engine's ``checkpoint.pt`` (its
``model_spec`` is :func:`denoiser_spec`, rebuilt by :func:`build_denoiser`) and, once finished, that export;
:func:`load_denoiser` reads either, and the run directories of earlier versions (``latest.json`` naming an
``epoch-NNNN/`` export).

Why one file (~490 lines): both denoiser kinds share the metadata file, the σ handling, the spec and the loader
that picks the kind from ``denoiser.json`` or the spec; :class:`DenoisedClassifier` is the ten lines that use
them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoothtransfer._optional import require
from smoothtransfer.errors import UserError
from smoothtransfer.models.checkpoint import RUN_CHECKPOINT, load_checkpoint
from smoothtransfer.utils import atomic_write_json

METADATA = "denoiser.json"
FORMAT_VERSION = 1
#: written by `train-denoiser` before the training engine (read only): names the newest epoch-NNNN directory
LATEST = "latest.json"

DIFFUSION_SIZES = ("tiny", "small", "ddpm-cifar10")
MSE_SIZES = {"tiny": (5, 16), "small": (10, 32), "dncnn": (17, 64)}  # (depth, width)


# ----------------------------------------------------------------------------------------------------
# helpers


def _sigma_tensor(sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """σ as a float32 ``(B,)`` tensor (from a float, a 0-d tensor or a ``(B,)`` tensor); negative → UserError."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if s.dim() == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise UserError(f"sigma must be a float or a ({batch},) tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise UserError("sigma must be finite and >= 0")
    return s


def _check_images(x: torch.Tensor, channels: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise UserError(f"{what} expects (B,{channels},H,W) images, got shape {tuple(x.shape)}")


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / METADATA).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read denoiser metadata {path / METADATA}: {e}") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise UserError(f"{path / METADATA} is not a smoothtransfer denoiser description (no 'kind')")
    return meta


def _write_metadata(path: Path, meta: Mapping[str, Any]) -> None:
    atomic_write_json(path / METADATA, {"format_version": FORMAT_VERSION, **meta})


# ----------------------------------------------------------------------------------------------------
# diffusion (one-shot) denoiser


def create_diffusion_unet(image_size: int = 32, channels: int = 3, size: str = "tiny"):
    """A fresh (untrained) ``diffusers.UNet2DModel``.

    ``tiny`` (~0.5M params) is for CPU tests and demos; ``small`` (~6M) for quick GPU runs; ``ddpm-cifar10`` is
    Ho et al. (2020)'s 35.7M-parameter CIFAR-10 UNet (the config of ``google/ddpm-cifar10-32``: channels
    128-256-256-256, 2 res-blocks per level, attention at 16x16, dropout 0.1 as trained by Ho et al.).
    """
    # diffusers comes with the [diffusion] extra: imported where it is used, so certification needs it not.
    UNet2DModel = require("diffusers", "a diffusion denoiser").UNet2DModel

    common = dict(sample_size=image_size, in_channels=channels, out_channels=channels, act_fn="silu",
                  time_embedding_type="positional")
    if size == "tiny":
        cfg = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
    elif size == "small":
        cfg = dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                   dropout=0.1)
    elif size == "ddpm-cifar10":
        cfg = dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                   mid_block_scale_factor=1, norm_eps=1e-6, center_input_sample=False, dropout=0.1)
    else:
        raise UserError(f"unknown diffusion UNet size '{size}'; choose from: {', '.join(DIFFUSION_SIZES)}")
    levels = len(cfg["block_out_channels"])
    if image_size % (2 ** (levels - 1)):
        raise UserError(f"image size {image_size} is not divisible by {2 ** (levels - 1)} (UNet size '{size}')")
    return UNet2DModel(**common, **cfg)


def create_ddpm_scheduler(num_train_timesteps: int = 1000):
    """Ho et al.'s linear β schedule (1e-4 … 0.02 over 1000 steps), the one ``google/ddpm-cifar10-32`` uses."""
    DDPMScheduler = require("diffusers", "a diffusion denoiser").DDPMScheduler  # [diffusion] extra

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, clip_sample=True, prediction_type="epsilon")


class DiffusionDenoiser(nn.Module):
    """One-shot diffusion denoiser (Carlini et al. 2023; FT-CADIS Algorithm 2).

    The smoothing noise is added in [0,1] pixel space: ``x_noisy = x + δ``, ``δ ~ N(0, σ²I)``. The diffusion
    model works in [-1,1], where ``2·x_noisy − 1 = (2x − 1) + 2δ`` carries noise of std ``2σ``. With
    ``t* = argmin_t |(1−ᾱ_t)/ᾱ_t − (2σ)²|``, ``x_t = √ᾱ_t·(2·x_noisy − 1)`` is (up to the grid of t) a sample of
    the forward process ``√ᾱ_t·x_0 + √(1−ᾱ_t)·ε``, so one UNet call predicts ``ε̂`` and
    ``x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t``, clamped to [-1,1] and mapped back to [0,1].

    Args:
        unet: a ``diffusers.UNet2DModel`` (or any module called as ``unet(x_t, t, return_dict=False)[0]``).
        scheduler: a ``diffusers.DDPMScheduler`` (only its ``alphas_cumprod`` and ``prediction_type`` are used).
    """

    kind = "diffusion"

    def __init__(self, unet: nn.Module, scheduler) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        acp = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        # float64 for the t choice (ratios span 1e-4 … 1e4); not persistent: it is rebuilt from the scheduler.
        self.register_buffer("alphas_cumprod", acp.float(), persistent=False)
        self._ratios = ((1.0 - acp) / acp).tolist()  # (1−ᾱ_t)/ᾱ_t, increasing in t
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise UserError(f"unsupported diffusion prediction_type '{self.prediction_type}'")
        cfg = getattr(unet, "config", None)
        sample_size = getattr(cfg, "sample_size", None)
        self.image_size = int(sample_size[0] if isinstance(sample_size, (tuple, list)) else sample_size or 0)
        self.channels = int(getattr(cfg, "in_channels", 3))
        self.out_channels = int(getattr(cfg, "out_channels", self.channels))

    # -- the σ → t map -----------------------------------------------------------------------------------

    @property
    def max_sigma(self) -> float:
        """The largest σ (in [0,1] pixel units) the schedule covers: ``√(max (1−ᾱ)/ᾱ) / 2``."""
        return math.sqrt(max(self._ratios)) / 2.0

    def timestep_for_sigma(self, sigma: float) -> int:
        """``argmin_t |(1−ᾱ_t)/ᾱ_t − (2σ)²|``; σ beyond the schedule's range is a UserError."""
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma < 0:
            raise UserError(f"sigma must be finite and >= 0, got {sigma}")
        target = (2.0 * sigma) ** 2
        if target > max(self._ratios):
            raise UserError(f"sigma={sigma:g} is beyond the diffusion schedule's noise range "
                            f"(max sigma {self.max_sigma:.4g} in [0,1] pixel units)")
        return min(range(len(self._ratios)), key=lambda t: abs(self._ratios[t] - target))

    def _timesteps(self, sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
            s = _sigma_tensor(sigma, batch, device)
            uniq = {float(v): self.timestep_for_sigma(float(v)) for v in s.unique().tolist()}
            return torch.tensor([uniq[float(v)] for v in s.tolist()], dtype=torch.long, device=device)
        return torch.full((batch,), self.timestep_for_sigma(float(sigma)), dtype=torch.long, device=device)

    # -- denoising ---------------------------------------------------------------------------------------

    def forward(self, x_noisy: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``x_noisy``: ``(B,C,H,W)`` = clean image in [0,1] + N(0,σ²); ``sigma``: float or ``(B,)``.

        Returns the one-shot estimate of the clean image, ``(B,C,H,W)`` in [0,1], in ``x_noisy``'s dtype.
        Differentiable w.r.t. ``x_noisy`` (attacks on the smoothed classifier go through the denoiser).
        """
        _check_images(x_noisy, self.channels, "DiffusionDenoiser")
        b = x_noisy.shape[0]
        t = self._timesteps(sigma, b, x_noisy.device)
        acp = self.alphas_cumprod.to(x_noisy.device)[t].view(b, 1, 1, 1)
        sqrt_a, sqrt_1ma = acp.sqrt(), (1.0 - acp).sqrt()
        x_t = sqrt_a * (2.0 * x_noisy.float() - 1.0)
        out = self.unet(x_t, t, return_dict=False)[0].float()
        if out.shape[1] != self.channels:  # learned-variance UNets output [ε, variance]: keep ε
            out = out[:, : self.channels]
        if self.prediction_type == "epsilon":
            x0 = (x_t - sqrt_1ma * out) / sqrt_a
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v-prediction: v = √ᾱ·ε − √(1−ᾱ)·x_0  ⇒  x_0 = √ᾱ·x_t − √(1−ᾱ)·v
            x0 = sqrt_a * x_t - sqrt_1ma * out
        return ((x0.clamp(-1.0, 1.0) + 1.0) / 2.0).to(x_noisy.dtype)

    # -- persistence -------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size, "channels": self.channels,
                "prediction_type": self.prediction_type}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``unet/`` and ``scheduler/`` (diffusers' own format) and ``denoiser.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(d / "unet")
        self.scheduler.save_pretrained(d / "scheduler")
        _write_metadata(d, self.metadata())

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **kwargs) -> DiffusionDenoiser:
        """Load a UNet2DModel + DDPMScheduler.

        Accepts a local directory written by :meth:`save_pretrained` (or any diffusers pipeline directory with
        ``unet/`` and ``scheduler/``), a directory with the UNet's ``config.json`` and ``scheduler_config.json``
        at its root, or — online — a Hugging Face Hub id such as ``google/ddpm-cifar10-32`` (root layout).
        ``kwargs`` go to both ``from_pretrained`` calls (``local_files_only``, ``revision``, ...).
        """
        diffusers = require("diffusers", "a diffusion denoiser")  # [diffusion] extra, imported on use
        DDPMScheduler, UNet2DModel = diffusers.DDPMScheduler, diffusers.UNet2DModel

        src = str(path_or_hub_id)
        local = Path(src)
        if local.exists():
            if not local.is_dir():
                raise UserError(f"denoiser path {src} is not a directory")
            unet_sub = "unet" if (local / "unet" / "config.json").exists() else None
            sched_sub = "scheduler" if (local / "scheduler" / "scheduler_config.json").exists() else None
            if unet_sub is None and not (local / "config.json").exists():
                raise UserError(f"{src} holds no diffusers UNet (expected unet/config.json or config.json)")
            if sched_sub is None and not (local / "scheduler_config.json").exists():
                raise UserError(f"{src} holds no diffusers scheduler (expected scheduler/scheduler_config.json)")
            try:
                unet = UNet2DModel.from_pretrained(src, subfolder=unet_sub, **kwargs)
                scheduler = DDPMScheduler.from_pretrained(src, subfolder=sched_sub, **kwargs)
            except (OSError, ValueError, RuntimeError) as e:
                raise UserError(f"cannot load the diffusion denoiser in {src}: {e}") from None
            return cls(unet, scheduler)
        # A hub id (online users): try the pipeline layout (unet/, scheduler/) first, then the root layout.
        try:
            try:
                unet = UNet2DModel.from_pretrained(src, subfolder="unet", **kwargs)
            except OSError:
                unet = UNet2DModel.from_pretrained(src, **kwargs)
            try:
                scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kwargs)
            except OSError:
                scheduler = DDPMScheduler.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"'{src}' is neither a local denoiser directory nor a loadable hub model: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return cls(unet, scheduler)


# ----------------------------------------------------------------------------------------------------
# σ-conditioned MSE denoiser (DnCNN)


class MSEDenoiser(nn.Module):
    """σ-conditioned DnCNN (Zhang et al. 2017) as trained with the MSE objective by Salman et al. (2020).

    The input is the noisy image with an extra channel filled with σ (so one network serves several noise
    levels); the network predicts the noise residual (DnCNN's residual learning) and returns
    ``x_noisy − residual``. ``depth`` conv layers of ``width`` channels, BatchNorm between them.
    ``forward(x_noisy (B,C,H,W), sigma float | (B,)) -> (B,C,H,W)``, clamped to [0,1] unless ``clamp=False``
    (training uses the unclamped output so that the MSE gradient never vanishes at the range's edges).
    """

    kind = "mse"

    def __init__(self, channels: int = 3, image_size: int = 32, depth: int = 17, width: int = 64) -> None:
        super().__init__()
        if depth < 2 or width < 1 or channels < 1 or image_size < 1:
            raise UserError(f"invalid MSEDenoiser config: depth={depth} width={width} channels={channels}")
        self.channels, self.image_size, self.depth, self.width = channels, image_size, depth, width
        layers: list[nn.Module] = [nn.Conv2d(channels + 1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @classmethod
    def create(cls, size: str = "tiny", channels: int = 3, image_size: int = 32) -> MSEDenoiser:
        """``tiny`` (5 layers x 16), ``small`` (10 x 32) or ``dncnn`` (17 x 64, Salman et al.'s DnCNN)."""
        if size not in MSE_SIZES:
            raise UserError(f"unknown MSE denoiser size '{size}'; choose from: {', '.join(MSE_SIZES)}")
        depth, width = MSE_SIZES[size]
        return cls(channels=channels, image_size=image_size, depth=depth, width=width)

    def forward(self, x_noisy: torch.Tensor, sigma: float | torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """``x_noisy``: ``(B,C,H,W)`` in [0,1] + noise; returns the clean estimate ``(B,C,H,W)``."""
        _check_images(x_noisy, self.channels, "MSEDenoiser")
        b, _, h, w = x_noisy.shape
        s = _sigma_tensor(sigma, b, x_noisy.device).to(x_noisy.dtype)
        inp = torch.cat([x_noisy, s.view(b, 1, 1, 1).expand(b, 1, h, w)], dim=1)
        out = x_noisy - self.net(inp)
        return out.clamp(0.0, 1.0) if clamp else out

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size, "channels": self.channels,
                "depth": self.depth, "width": self.width}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``denoiser.json`` into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, d / "model.safetensors")
        _write_metadata(d, self.metadata())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MSEDenoiser:
        from safetensors.torch import load_file

        d = Path(directory)
        meta = _read_metadata(d)
        if meta.get("kind") != cls.kind:
            raise UserError(f"{d} holds a '{meta.get('kind')}' denoiser, not an MSE denoiser")
        try:
            model = cls(channels=int(meta["channels"]), image_size=int(meta["image_size"]),
                        depth=int(meta["depth"]), width=int(meta["width"]))
            model.load_state_dict(load_file(d / "model.safetensors"))
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot load the MSE denoiser in {d}: {e}") from None
        return model


# ----------------------------------------------------------------------------------------------------
# loading, compatibility, composition


def denoiser_spec(denoiser: nn.Module) -> dict[str, Any]:
    """The JSON-able ``model_spec`` of a denoiser's training checkpoint: what :func:`build_denoiser` needs to
    rebuild its architecture (``denoiser`` = the kind, its metadata, for diffusion the diffusers configs)."""
    spec = {"denoiser": denoiser.kind, **denoiser.metadata()}
    if denoiser.kind == "diffusion":
        spec["unet_config"] = json.dumps(dict(denoiser.unet.config), default=str)
        spec["scheduler_config"] = json.dumps(dict(denoiser.scheduler.config), default=str)
    return spec


def build_denoiser(spec: Mapping[str, Any]) -> nn.Module:
    """The (untrained, randomly initialised) denoiser that :func:`denoiser_spec` describes."""
    kind = spec.get("denoiser")
    try:
        if kind == "diffusion":
            diffusers = require("diffusers", "a diffusion denoiser")  # [diffusion] extra, imported on use
            return DiffusionDenoiser(diffusers.UNet2DModel.from_config(json.loads(spec["unet_config"])),
                                     diffusers.DDPMScheduler.from_config(json.loads(spec["scheduler_config"])))
        if kind == "mse":
            return MSEDenoiser(channels=int(spec["channels"]), image_size=int(spec["image_size"]),
                               depth=int(spec["depth"]), width=int(spec["width"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"invalid denoiser spec ({type(e).__name__}: {e})") from None
    raise UserError(f"unknown denoiser kind {kind!r} in the spec; choose from: diffusion, mse")


def _from_checkpoint(path: Path) -> nn.Module:
    """The denoiser whose weights a ``train-denoiser`` checkpoint file holds."""
    ckpt = load_checkpoint(path, mmap=True)  # the optimiser state beside the weights is never read
    spec = ckpt["model_spec"]
    if not spec.get("denoiser"):
        raise UserError(f"{path} holds a classifier, not a denoiser (pass it as --checkpoint)")
    with torch.random.fork_rng(devices=[]):  # the random initialisation must not move the caller's RNG
        model = build_denoiser(spec)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: the weights do not fit the denoiser spec: {str(e).splitlines()[0]}") from None
    return model


def _resolve_dir(path: Path) -> Path:
    """Follow ``latest.json`` (a run directory of an earlier train-denoiser) to its newest epoch directory."""
    if not (path / METADATA).exists() and (path / LATEST).exists():
        try:
            name = json.loads((path / LATEST).read_text())["path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"corrupt {path / LATEST}: {e}") from None
        return path / name
    return path


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a denoiser: a ``train-denoiser`` run directory (its ``checkpoint.pt``: the newest weights, also
    while it trains) or checkpoint file, a directory written by ``save_pretrained``, a run directory of an
    earlier version (``latest.json``), or, online, a hub id.

    Returns the module on ``device`` in eval mode with its parameters frozen (``requires_grad=False``).
    ``denoiser.json`` says the kind; a bare diffusers directory (no metadata) loads as a diffusion denoiser.
    """
    if os.fspath(path).startswith("hf-hub:"):  # the spelling --checkpoint uses for hub models
        path = os.fspath(path)[len("hf-hub:"):]
    p = Path(path)
    if p.exists():
        ckpt = p if p.is_file() else p / RUN_CHECKPOINT
        if ckpt.is_file():
            model: nn.Module = _from_checkpoint(ckpt)
        else:
            p = _resolve_dir(p)
            if (p / METADATA).exists():
                kind = _read_metadata(p)["kind"]
            elif (p / "unet").is_dir() or (p / "scheduler_config.json").exists():
                kind = "diffusion"
            else:
                raise UserError(f"{path} is not a denoiser directory (no {METADATA})")
            if kind == "diffusion":
                model = DiffusionDenoiser.from_pretrained(p)
            elif kind == "mse":
                model = MSEDenoiser.from_pretrained(p)
            else:
                raise UserError(f"unknown denoiser kind '{kind}' in {p / METADATA}; choose from: diffusion, mse")
    elif "/" in str(path) and not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1:
        model = DiffusionDenoiser.from_pretrained(str(path))  # hub id, e.g. google/ddpm-cifar10-32
    else:
        raise UserError(f"denoiser {path} does not exist")
    model.requires_grad_(False)
    return model.to(device).eval()


def check_compatible(denoiser: nn.Module, classifier_spec: Mapping[str, Any] | nn.Module) -> None:
    """UserError unless the denoiser's output fits the classifier's input (size, channels, [0,1] range).

    ``classifier_spec``: a ``Classifier.spec`` dict (``input_size``, ``in_chans``, optional ``input_range``)
    or a module with ``.spec``. Run this before any work so that a mismatch fails in one line, not mid-run.
    """
    spec = getattr(classifier_spec, "spec", classifier_spec)
    if not isinstance(spec, Mapping):
        raise UserError("check_compatible needs a classifier spec (dict) or a module with .spec")
    d_size, d_ch = getattr(denoiser, "image_size", None), getattr(denoiser, "channels", None)
    c_size, c_ch = spec.get("input_size"), spec.get("in_chans", 3)
    if c_ch is not None and d_ch is not None and int(c_ch) != int(d_ch):
        raise UserError(f"denoiser outputs {d_ch}-channel images but the classifier takes {c_ch} channels")
    if c_size is not None and d_size and int(c_size) != int(d_size) and not spec.get("resizes_input"):
        raise UserError(f"denoiser works on {d_size}x{d_size} px images but the classifier takes "
                        f"{c_size}x{c_size} px")
    rng = spec.get("input_range", (0.0, 1.0))
    if rng is not None and tuple(float(v) for v in rng) != (0.0, 1.0):
        raise UserError(f"the classifier takes inputs in {list(rng)} but denoisers output [0, 1] images; "
                        f"use a classifier whose first layer normalises [0,1] inputs")


class DenoisedClassifier(nn.Module):
    """Base classifier ``f(D(x_noisy, σ))`` for denoised smoothing (Salman et al. 2020; Carlini et al. 2023).

    ``forward(x_noisy (B,C,H,W) in [0,1] + N(0,σ²)) -> logits (B,K)``. The denoiser (frozen) is part of the
    base classifier, so ``Smooth`` certifies the composition unchanged. Built in eval mode; σ is checked
    against the denoiser's range here, before any sampling.
    """

    def __init__(self, denoiser: nn.Module, classifier: nn.Module, sigma: float) -> None:
        super().__init__()
        if isinstance(denoiser, DiffusionDenoiser):
            denoiser.timestep_for_sigma(sigma)  # UserError now if σ is out of the schedule's range
        elif not math.isfinite(float(sigma)) or float(sigma) < 0:
            raise UserError(f"sigma must be finite and >= 0, got {sigma}")
        spec = getattr(classifier, "spec", None)
        if isinstance(spec, Mapping):
            check_compatible(denoiser, spec)
        self.denoiser = denoiser.requires_grad_(False)
        self.classifier = classifier
        self.sigma = float(sigma)
        self.num_classes = getattr(classifier, "num_classes", None) or (spec or {}).get("num_classes")
        self.eval()

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x_noisy, self.sigma))
