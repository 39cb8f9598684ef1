"""SimCLR self-supervised pre-training (Chen et al., 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", arXiv:2002.05709), as used for the self-supervised source models of "A Study of the
Effects of Transfer Learning on Adversarial Robustness".

Two augmented views of every image go through the backbone (``model.forward_features``) and a projection MLP
owned by this objective; the NT-Xent loss pulls the two views of an image together and pushes all other
``2B - 2`` samples (``2BW - 2`` across ``W`` DDP ranks) away.

How the trainer uses it (the projection head lives here, not in the model):

- build it with the backbone's feature width: ``build_objective("simclr", feature_dim=model.num_features)``;
- optimise ``objective.parameters()`` together with the model's (the head is needed only for pre-training);
- fine-tuning loads the backbone checkpoint and calls ``model.reset_head(num_classes)``; the projection head
  is dropped with the objective.
- under DDP, wrap model and objective together in one DDP module (as ``train.loop.TrainStep`` does, with
  ``find_unused_parameters=True`` since the classifier head is unused) so that ``model.forward_features``
  runs inside DDP's forward; every rank must contribute the same batch size to the all-gather. A model that
  is itself DDP-wrapped must have been built with ``num_classes=0`` (``forward`` then returns the features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.objectives.base import OBJECTIVES, Objective, ObjectiveOutput

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, generator: torch.Generator | None, device: torch.device, low=0.0, high=1.0) -> torch.Tensor:
    """``(n,)`` uniform draws on ``device`` from ``generator`` (drawn on the generator's own device)."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gdev).to(device)
    return low + (high - low) * u


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(B,3,H,W)`` -> ``(B,1,H,W)`` luma."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(B,3,H,W)`` RGB in [0,1] -> HSV with every channel in [0,1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    # hue sector depends on which channel is the maximum
    h = torch.where(
        argmax == 0, ((g - b) / d) % 6, torch.where(argmax == 1, (b - r) / d + 2, (r - g) / d + 4)
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: ``(B,3,H,W)`` HSV in [0,1] -> RGB in [0,1]."""
    h, s, v = x.unbind(1)
    # standard closed form: channel n gets v - v*s*max(0, min(k, 4-k, 1)) with k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * a + (1 - factor) * b`` clamped to [0,1]; ``factor``: ``(B,)``."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1.0 - f) * b).clamp(0.0, 1.0)


class SimCLRAugment(nn.Module):
    """SimCLR's CIFAR augmentation, vectorised over a batch with an independent random draw per image.

    torchvision's transforms draw one parameter set per call, i.e. per batch, which would make every image in
    a batch share one crop; this module draws per image and applies everything with batched tensor ops (one
    ``grid_sample`` for crop+flip), so it runs at a few ms per 256x3x32x32 batch on CPU.

    Pipeline (Chen et al., 2020, Appendix A, CIFAR variant without blur): random resized crop (area
    ``scale``, aspect ratio 3/4..4/3 relative to the image's, resized back to the input size, bilinear) ->
    horizontal flip (p=0.5) -> colour jitter (brightness, contrast, saturation ``0.8*s``, hue ``0.2*s``) with
    probability ``p_jitter`` -> grayscale with probability ``p_gray``. The order of the four jitter operations
    is drawn once per call (torchvision draws it once per image). Crops that do not fit after 10 tries fall
    back to the whole image, as in torchvision.

    ``forward(x (B,C,H,W) in [0,1]) -> (B,C,H,W) in [0,1]``. Colour operations other than brightness/contrast
    apply only to 3-channel images.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        strength: float = 0.5,
        p_jitter: float = 0.8,
        p_gray: float = 0.2,
        p_flip: float = 0.5,
    ) -> None:
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1):
            raise UserError(f"simclr crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise UserError(f"simclr crop ratio must satisfy 0 < min <= max, got {ratio}")
        for name, p in (("p_jitter", p_jitter), ("p_gray", p_gray), ("p_flip", p_flip)):
            if not 0 <= p <= 1:
                raise UserError(f"simclr {name} must be in [0,1], got {p}")
        if strength < 0:
            raise UserError(f"simclr colour-jitter strength must be >= 0, got {strength}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.brightness = self.contrast = self.saturation = 0.8 * strength
        self.hue = min(0.2 * strength, 0.5)
        self.p_jitter, self.p_gray, self.p_flip = p_jitter, p_gray, p_flip

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        tries = 10
        area = _rand(b * tries, g, dev, *self.scale).view(b, tries)
        logr = _rand(b * tries, g, dev, math.log(self.ratio[0]), math.log(self.ratio[1])).view(b, tries)
        # crop width/height as fractions of the (square-normalised) image side
        w = torch.sqrt(area * torch.exp(logr))
        h = torch.sqrt(area / torch.exp(logr))
        ok = (w <= 1) & (h <= 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(b, dtype=torch.long, device=dev))
        w = w.gather(1, first[:, None]).squeeze(1)
        h = h.gather(1, first[:, None]).squeeze(1)
        none_ok = ~ok.any(1)
        w = torch.where(none_ok, torch.ones_like(w), w)
        h = torch.where(none_ok, torch.ones_like(h), h)
        cx = (1 - w) * _rand(b, g, dev)  # left edge in [0, 1-w]
        cy = (1 - h) * _rand(b, g, dev)
        flip = torch.where(_rand(b, g, dev) < self.p_flip, -1.0, 1.0)
        # affine_grid maps output coords in [-1,1] to input coords: x_in = w*flip*x_out + centre
        theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = 2 * cx + w - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * cy + h - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        b, dev, rgb = x.shape[0], x.device, x.shape[1] == 3
        order = torch.randperm(4, generator=g, device=g.device if g is not None else "cpu").tolist()
        bf = _rand(b, g, dev, 1 - self.brightness, 1 + self.brightness)
        cf = _rand(b, g, dev, 1 - self.contrast, 1 + self.contrast)
        sf = _rand(b, g, dev, 1 - self.saturation, 1 + self.saturation)
        hf = _rand(b, g, dev, -self.hue, self.hue)
        for op in order:
            if op == 0:
                x = (x * bf.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
            elif op == 1:
                mean = (_gray(x) if rgb else x).mean(dim=(1, 2, 3), keepdim=True)
                x = _blend(x, mean.expand_as(x), cf)
            elif op == 2 and rgb:
                x = _blend(x, _gray(x).expand_as(x), sf)
            elif op == 3 and rgb and self.hue > 0:
                hsv = _rgb_to_hsv(x)
                hsv = torch.cat(((hsv[:, :1] + hf.view(-1, 1, 1, 1)) % 1.0, hsv[:, 1:]), dim=1)
                x = _hsv_to_rgb(hsv).clamp(0.0, 1.0)
        return x

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise UserError(f"simclr augmentation expects (B,C,H,W) images, got shape {tuple(x.shape)}")
        b, dev = x.shape[0], x.device
        x = self._crop_flip(x, generator)
        jit = (_rand(b, generator, dev) < self.p_jitter).view(-1, 1, 1, 1)
        x = torch.where(jit, self._jitter(x, generator), x)
        if x.shape[1] == 3:
            gray = (_rand(b, generator, dev) < self.p_gray).view(-1, 1, 1, 1)
            x = torch.where(gray, _gray(x).expand_as(x), x)
        return x.clamp(0.0, 1.0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's part (all-reduce, then slice).

    Written out because ``torch.distributed.nn.functional.all_gather`` is deprecated (a FutureWarning per call
    in torch 2.x) and the functional-collectives replacement is private API.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``z`` ``(N,D)`` from every DDP rank -> ``(N*W, D)`` and this rank's row offset.

    The backward sums the gradients that all ranks' losses send to each rank's part; after DDP averages
    parameter gradients over ranks this is exactly the gradient of the global mean loss (the common "keep only
    the local part in the graph" trick drops the cross-rank terms). Every rank must pass the same ``N``.
    Without an initialised process group (or with one rank) returns ``(z, 0)``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    return _GatherWithGrad.apply(z), dist.get_rank() * z.shape[0]


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NT-Xent (normalised temperature-scaled cross entropy; Chen et al., 2020, eq. 1) over ``2B`` samples.

    ``z1, z2``: ``(B, D)`` projections of the two views (row ``i`` of each is the same image). With
    ``u = normalize(cat(z1, z2))`` ``(2B, D)`` and ``s_ij = u_i . u_j / temperature``,
    ``loss = mean_i -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )`` with ``p(i) = (i + B) mod 2B``.
    Under DDP the keys are gathered from every rank (see :func:`gather_with_grad`), so the negatives are the
    ``2BW - 2`` other samples of the global batch; the loss is the mean over this rank's ``2B`` queries.

    Returns ``(loss scalar, logits (2B, 2BW) with the self-similarity at -inf, positive column index (2B,))``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise UserError(
            f"nt_xent expects two (B, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise UserError(f"simclr temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    q = F.normalize(torch.cat((z1, z2), dim=0).float(), dim=1)  # (2B, D) local queries
    keys, offset = gather_with_grad(q) if gather else (q, 0)
    logits = q @ keys.t() / temperature  # (2B, 2BW)
    rows = torch.arange(2 * b, device=q.device)
    self_col = rows + offset
    logits = logits.masked_fill(F.one_hot(self_col, keys.shape[0]).bool(), float("-inf"))
    pos = (rows + b) % (2 * b) + offset
    loss = F.cross_entropy(logits, pos)
    return loss, logits, pos


@OBJECTIVES.register("simclr")
class SimCLRObjective(Objective):
    """SimCLR pre-training objective (Chen et al., 2020); labels are ignored.

    Parameters: ``feature_dim`` — width ``D`` of ``model.forward_features`` (required: the trainer passes
    ``model.num_features``), ``temperature`` (0.5, the paper's CIFAR value), ``proj_dim`` (128),
    ``hidden_dim`` (defaults to ``feature_dim``), ``crop_scale`` ((0.08, 1)), ``jitter_strength`` (0.5).

    Projection head ``g``: Linear(D, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, proj_dim), as in the
    official implementation. ``forward(model, x (B,C,H,W) in [0,1], y ignored)`` returns

    - ``loss``: NT-Xent over the ``2B`` views (``2BW`` keys under DDP);
    - ``logits``: the first view's contrastive logits ``(B, 2BW)`` — not class logits; the positive of row
      ``i`` is column ``offset + B + i``. The trainer uses ``logits`` for accuracy only if ``uses_labels``;
    - ``logs``: ``nt_xent`` and ``pos_acc`` (fraction of the ``2B`` queries whose most similar other sample is
      their positive).
    """

    uses_labels = False

    def __init__(
        self,
        feature_dim: int | None = None,
        temperature: float = 0.5,
        proj_dim: int = 128,
        hidden_dim: int | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        jitter_strength: float = 0.5,
    ) -> None:
        super().__init__()
        if feature_dim is None:
            raise UserError("objective 'simclr' needs feature_dim (pass feature_dim=model.num_features)")
        hidden_dim = feature_dim if hidden_dim is None else hidden_dim
        for name, v in (("feature_dim", feature_dim), ("proj_dim", proj_dim), ("hidden_dim", hidden_dim)):
            if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v or v <= 0:
                raise UserError(f"simclr {name} must be a positive integer, got {v!r}")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
            raise UserError(f"simclr temperature must be a positive number, got {temperature!r}")
        if not (isinstance(crop_scale, list | tuple) and len(crop_scale) == 2):
            raise UserError(f"simclr crop_scale must be two numbers (min, max area), got {crop_scale!r}")
        self.feature_dim, self.temperature = int(feature_dim), float(temperature)
        self.augment = SimCLRAugment(scale=tuple(crop_scale), strength=jitter_strength)
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, int(hidden_dim)),
            nn.BatchNorm1d(int(hidden_dim)),
            nn.ReLU(inplace=True),
            nn.Linear(int(hidden_dim), int(proj_dim)),
        )

    @staticmethod
    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B,C,H,W) -> (B,D)`` backbone features.

        Under DDP the wrapper's own ``forward`` must run (it prepares gradient synchronisation), so a wrapped
        model must have been built with ``num_classes=0``, which makes ``forward`` return the features.
        """
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            spec = getattr(model.module, "spec", None) or {}
            if spec.get("num_classes", 0) != 0:
                raise UserError("SimCLR pre-training under DDP needs a model built with num_classes=0")
            return model(x)
        return model.forward_features(x)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> ObjectiveOutput:
        b = x.shape[0]
        if b < 2:
            raise UserError("SimCLR needs at least 2 images per batch (the other images are the negatives)")
        views = torch.cat((self.augment(x), self.augment(x)), dim=0)  # (2B,C,H,W); one forward for BN/DDP
        h = self.features(model, views)
        if h.dim() != 2 or h.shape[1] != self.feature_dim:
            raise UserError(
                f"simclr was built with feature_dim={self.feature_dim} but the model's features "
                f"have shape {tuple(h.shape)}"
            )
        z = self.projector(h)
        loss, logits, pos = nt_xent(z[:b], z[b:], self.temperature)
        with torch.no_grad():
            pos_acc = (logits.argmax(dim=1) == pos).float().mean().item()
        return ObjectiveOutput(loss, logits[:b].detach(), {"nt_xent": loss.item(), "pos_acc": pos_acc})
