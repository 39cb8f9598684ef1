"""Empirical L2 robustness: attacks on the base classifier and on the smoothed classifier.

* :func:`pgd_l2` — PGD-L2 (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial
  Attacks"): normalised-gradient ascent steps on the cross-entropy, each followed by the projection onto the
  eps-ball around ``x`` and onto [0,1].
* :func:`autopgd_l2` — AutoPGD-L2 (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks", Algorithm 1): step size ``2 * eps`` halved at the checkpoints
  of :func:`apgd_checkpoints` when progress stalls (then restarting from the best point so far), momentum
  0.75, random restarts. The empirical robust accuracy of "A Study of the Effects of Transfer Learning on
  Adversarial Robustness" is AutoPGD-L2 at eps = 0.5.
* :func:`smoothed_pgd` — PGD-L2 on the soft smoothed classifier (Salman et al., 2019, "Provably Robust Deep
  Learning via Adversarially Trained Smoothed Classifiers", the SmoothAdv attack).
* :func:`certificate_check` — an empirical falsification test of certificates: attack every certified image
  inside its certified ball and check that the smoothed classifier still predicts the certified class.

The three attacks are our own code (no attack library): they are short, the library we used before
(torchattacks) pinned ``requests`` to an old release in every environment we were installed into and
re-seeded torch's global RNG, and owning them lets every random draw come from a ``torch.Generator`` the
caller controls. ``tests/evaluation/test_attacks.py`` checks them against closed-form minimal perturbations.

Models take ``(B,C,H,W)`` images in [0,1] (the input normalisation is their first layer) and return logits
``(B,K)``. Every returned ``x_adv`` satisfies ``||x_adv - x||_2 <= eps`` per image and lies in [0,1]: the
projection scales ``x_adv - x`` into the ball, then clamps to [0,1], which (``x`` being in [0,1]) only moves
coordinates towards ``x`` and so stays in the ball.

Why one file (~670 lines): the three attacks share the projection, the losses, the argument checks and
the batch iterator, and the two evaluations below them (:func:`robust_accuracy`, :func:`certificate_check`)
are short drivers of the same attacks; split off, each part would import most of the rest.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.sampling import eval_mode
from smoothtransfer.smoothing.smooth import ABSTAIN, Smooth

log = logging.getLogger(__name__)

#: Attack names accepted by :func:`robust_accuracy` and ``smoothtransfer attack --attack``.
ATTACKS = ("apgd-l2", "pgd-l2", "smoothed-pgd")

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------------
# validation helpers


def _check_eps(eps: Any) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"eps must be a positive number, got {eps!r}") from None
    if not (math.isfinite(e) and e > 0):
        raise UserError(f"eps must be a positive number (L2 radius in [0,1] pixel units), got {eps}")
    return e


def check_pos_int(value: Any, name: str) -> int:
    """``value`` as an ``int >= 1`` (``3.0`` counts, ``True`` does not); UserError naming ``name`` otherwise."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_batch(x: Any, y: Any) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"x must be a float tensor (B,C,H,W) in [0,1], got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise UserError(
            f"y must be a label tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', type(y))}"
        )


def _check_generator(generator: torch.Generator | None, x: torch.Tensor) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise UserError(
            f"the random generator is on {generator.device} but the images are on {x.device}; "
            f"create it with torch.Generator(device='{x.device.type}')"
        )


def _generator(seed: int | None, generator: torch.Generator | None, x: torch.Tensor) -> torch.Generator | None:
    """``generator`` if given, else a private one seeded with ``seed``, else None (torch's default RNG)."""
    if generator is not None:
        _check_generator(generator, x)
        return generator
    if seed is None:
        return None
    return torch.Generator(device=x.device).manual_seed(int(seed))


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_classifier(model: nn.Module, num_classes: int | None = None) -> int | None:
    """The number of classes of ``model`` from its ``spec`` (None without one); UserError without a head.

    A pre-trained backbone saved with ``num_classes=0`` (e.g. SimCLR) returns features, not logits: attacking
    or certifying it is meaningless. With ``num_classes`` given (the dataset's), a mismatch is a UserError.
    """
    spec = getattr(model, "spec", None)
    k = spec.get("num_classes") if isinstance(spec, dict) else None
    if isinstance(spec, dict) and not k:
        raise UserError(
            "the checkpoint has no classifier head (num_classes 0); fine-tune it on a labelled dataset first"
        )
    if k is not None and num_classes is not None and int(k) != int(num_classes):
        raise UserError(f"the checkpoint classifies {k} classes but the dataset has {num_classes}")
    return int(k) if k is not None else num_classes


# ------------------------------------------------------------------------------------------------------
# L2 geometry and losses (per image; images may be NCHW or channels_last)


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms ``(B,)`` of ``v (B, ...)``."""
    return v.flatten(1).norm(dim=1)


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B,1,1,1)`` to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` scaled to unit L2 norm per image (a zero image stays zero)."""
    return v / _per_image(_norms(v) + 1e-12, v)


def project(x: torch.Tensor, x_new: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_new`` moved into ``{z : ||z - x||_2 <= eps} ∩ [0,1]^d``, per image.

    The offset ``x_new - x`` is scaled down to norm ``eps`` when longer, then the point is clamped to
    [0,1]; with ``x`` in [0,1] the clamp moves each coordinate towards ``x``, so the result stays in the ball.
    """
    delta = x_new - x
    scale = torch.clamp(eps / (_norms(delta) + 1e-12), max=1.0)
    return (x + delta * _per_image(scale, x)).clamp_(0.0, 1.0)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def _dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference-of-logits-ratio loss (untargeted), per image."""
    z = logits.float()
    if z.shape[1] < 3:
        raise UserError(f"the DLR loss needs at least 3 classes, the model has {z.shape[1]}; use loss='ce'")
    z_sorted, order = z.sort(dim=1)
    z_y = z.gather(1, y[:, None])[:, 0]
    best_other = torch.where(order[:, -1] == y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - best_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def _loss_and_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[torch.Tensor, ...]:
    """``(logits, per-image loss, d loss / d x_adv)``, all detached; the model's parameter grads are untouched."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), loss.detach(), grad.detach()


# ------------------------------------------------------------------------------------------------------
# attacks on the base classifier


def pgd_l2_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The PGD-L2 iteration itself, for callers that manage the model's mode (adversarial training).

    No validation and no mode change: the model is called as it is (put it in eval mode for an attack).
    Start: ``x``, or with ``random_start`` a random direction at a radius uniform in ``[0, eps]`` (as in
    Madry et al.'s and torchattacks' PGD-L2), drawn from ``generator`` (None: torch's default RNG). Each step:
    ``x' <- project(x' + step_size * g / ||g||)`` with ``g`` the gradient of the cross-entropy at ``x'``.
    Returns the last iterate, detached, in ``x``'s dtype and memory format.
    """
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * eps
        x_adv = project(x, x + _unit(direction) * _per_image(radius, x), eps)
    for _ in range(steps):
        _, _, grad = _loss_and_grad(model, x_adv, y, _ce)
        x_adv = project(x, x_adv + step_size * _unit(grad), eps)
    return x_adv.detach()


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD-L2 (Madry et al., 2018): the last iterate, ``(B,C,H,W)`` in [0,1]; see :func:`pgd_l2_steps`.

    ``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)`` true labels (cross-entropy is maximised). ``step_size``
    defaults to ``2.5 * eps / steps`` (Madry et al.'s rule, so that the ball's boundary is reachable from any
    start). The random start comes from ``generator``, else from a private generator seeded with ``seed``,
    else from torch's default RNG. The model runs in eval mode (each module's flag restored afterwards).
    """
    eps = _check_eps(eps)
    steps = check_pos_int(steps, "steps")
    _check_batch(x, y)
    step_size = 2.5 * eps / steps if step_size is None else _check_eps(step_size)
    gen = _generator(seed, generator, x)
    with eval_mode(model):
        return pgd_l2_steps(model, x, y, eps, steps, step_size, random_start, gen)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ``w_j`` after which AutoPGD may halve its step size (Croce & Hein, 2020, Sec. 3.1).

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, ``w_j = p_j * steps``,
    with the period, its decrement and its floor rounded down to whole iterations (at least one each) as in
    the authors' code; e.g. ``[22, 41, 57, 70, 80, 87, 93, 99]`` for 100 steps.
    """
    period = max(int(0.22 * steps), 1)
    decrement = max(int(0.03 * steps), 1)
    floor = max(int(0.06 * steps), 1)
    out, w = [], 0
    while w + period <= steps:
        w += period
        out.append(w)
        period = max(period - decrement, floor)
    return out


def _apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    loss_fn,
    generator: torch.Generator | None,
    rho: float = 0.75,
    momentum: float = 0.75,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One AutoPGD-L2 run from a random point on the eps-sphere: ``(fooled (B,) bool, x_adv)``.

    ``x_adv`` is the last iterate the model misclassified where ``fooled``, else the highest-loss point.
    """
    b = x.shape[0]
    start = x + eps * _unit(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    x_adv = start.clamp(0.0, 1.0)
    logits, loss, grad = _loss_and_grad(model, x_adv, y, loss_fn)
    fooled = logits.argmax(1) != y
    x_fooled = x_adv.clone()
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full((b,), 2.0 * eps, device=x.device, dtype=x.dtype)
    checks = set(apgd_checkpoints(steps))
    last_check = 0
    increases = torch.zeros(b, device=x.device)
    loss_prev = loss
    loss_best_at_check = loss_best.clone()
    halved_at_check = torch.ones(b, dtype=torch.bool, device=x.device)  # "true" before the first check
    x_prev = x_adv
    for i in range(steps):
        with torch.no_grad():
            a = 1.0 if i == 0 else momentum
            z = project(x, x_adv + _per_image(step, x) * _unit(grad), eps)
            x_new = project(x, x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - x_prev), eps)
            x_prev, x_adv = x_adv, x_new
        logits, loss, grad = _loss_and_grad(model, x_adv, y, loss_fn)
        with torch.no_grad():
            wrong = logits.argmax(1) != y
            x_fooled = torch.where(_per_image(wrong, x), x_adv, x_fooled)
            fooled |= wrong
            increases += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best = torch.where(_per_image(better, x), x_adv, x_best)
            grad_best = torch.where(_per_image(better, x), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            if i + 1 in checks:
                # Condition 1: the loss rose in at most rho of the steps since the last checkpoint.
                # Condition 2: the step was not halved at the last checkpoint and the best loss has not moved.
                stalled = increases <= rho * (i + 1 - last_check)
                stuck = ~halved_at_check & (loss_best_at_check >= loss_best)
                halve = stalled | stuck
                step = torch.where(halve, step / 2, step)
                x_adv = torch.where(_per_image(halve, x), x_best, x_adv)  # restart from the best point
                grad = torch.where(_per_image(halve, x), grad_best, grad)
                halved_at_check, loss_best_at_check = halve, loss_best.clone()
                increases.zero_()
                last_check = i + 1
    return fooled, torch.where(_per_image(fooled, x), x_fooled, x_best)


def autopgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 0.5,
    steps: int = 100,
    n_restarts: int = 1,
    loss: str = "ce",
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AutoPGD-L2 (Croce & Hein, 2020, Algorithm 1), ``(B,C,H,W)`` in [0,1].

    Each run starts on the eps-sphere around ``x`` (random direction, clamped to [0,1]) with step size
    ``2 * eps`` and steps ``z = P(x_k + eta * g / ||g||)``, ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k -
    x_{k-1}))`` (the first step without momentum), ``P`` the projection onto the ball and [0,1]. At the
    checkpoints of :func:`apgd_checkpoints` the step size of an image is halved, and its iterate reset to
    its best point so far, when its loss rose in at most 75% of the steps since the last checkpoint, or when
    its step was not halved last time and its best loss has not improved since.

    Only images the model classifies correctly are attacked, and each restart attacks only those not yet
    fooled; an image's result is the point of the first run that fooled the model, otherwise ``x`` itself.
    ``loss``: ``'ce'`` (cross-entropy) or ``'dlr'`` (needs >= 3 classes). Random starts come from
    ``generator``, else from a private generator seeded with ``seed`` (torch's global RNG is never touched).
    The model runs in eval mode (each module's flag restored afterwards).
    """
    eps = _check_eps(eps)
    steps = check_pos_int(steps, "steps")
    n_restarts = check_pos_int(n_restarts, "n_restarts")
    if loss not in ("ce", "dlr"):
        raise UserError(f"autopgd loss must be 'ce' or 'dlr', got {loss!r}")
    _check_batch(x, y)
    loss_fn = _ce if loss == "ce" else _dlr
    gen = _generator(seed, generator, x)
    x = x.detach()
    adv = x.clone()
    with eval_mode(model):
        with torch.no_grad():
            todo = model(x).argmax(1) == y
        for _ in range(n_restarts):
            idx = todo.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            fooled, x_run = _apgd_run(model, x[idx], y[idx], eps, steps, loss_fn, gen)
            adv[idx[fooled]] = x_run[fooled]
            todo[idx[fooled]] = False
    return adv


# ------------------------------------------------------------------------------------------------------
# attack on the smoothed classifier


def smoothed_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigma: float,
    eps: float,
    steps: int = 20,
    m: int = 16,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    batch_max: int = 2048,
) -> torch.Tensor:
    """SmoothAdv PGD-L2 (Salman et al., 2019, eq. 5) on the soft smoothed classifier; ``(B,C,H,W)`` in [0,1].

    Maximises ``-log( (1/m) sum_i softmax(f(x' + delta_i))_y )`` over ``||x' - x||_2 <= eps``, ``x'`` in
    [0,1], with normalised-gradient steps starting at ``x``; returns the last iterate. The ``m`` noise samples
    ``delta_i ~ N(0, sigma^2 I)`` (float32, added to ``x'`` unclamped, as in certification) are drawn **afresh
    at every step** (an expectation-over-transformation estimate, as in Salman et al.'s evaluation code), so
    over ``steps`` steps the attack sees ``steps * m`` noise draws. ``step_size`` defaults to
    ``2 * eps / steps`` (Salman et al.'s setting). ``generator`` draws the noise (None: torch's default RNG).
    ``batch_max`` caps the noisy images per forward pass (at least ``m``: one image's copies at a time).
    """
    eps = _check_eps(eps)
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma}")
    steps = check_pos_int(steps, "steps")
    m = check_pos_int(m, "m (noise samples per step)")
    _check_batch(x, y)
    _check_generator(generator, x)
    step_size = 2.0 * eps / steps if step_size is None else _check_eps(step_size)
    per_pass = max(1, int(batch_max) // m)  # images whose m noisy copies share one forward pass
    x = x.detach()
    x_adv = x.clone()
    with eval_mode(model):
        for _ in range(steps):
            grad = torch.empty_like(x)
            for s in range(0, x.shape[0], per_pass):
                xa = x_adv[s : s + per_pass].detach().requires_grad_(True)
                b = xa.shape[0]
                noise = torch.randn((b, m, *xa.shape[1:]), generator=generator, device=x.device,
                                    dtype=torch.float32)
                with torch.enable_grad():
                    noisy = (xa.float()[:, None] + sigma * noise).flatten(0, 1)
                    probs = F.softmax(model(noisy).float(), dim=1).view(b, m, -1).mean(dim=1)
                    loss = F.nll_loss(probs.clamp_min(1e-20).log(), y[s : s + per_pass], reduction="sum")
                    (grad[s : s + per_pass],) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                x_adv = project(x, x_adv + step_size * _unit(grad), eps)
    return x_adv


# ------------------------------------------------------------------------------------------------------
# dataset-level evaluation


def iter_batches(
    data, batch_size: int, indices: Sequence[int] | None, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(x (B,C,H,W) float [0,1], y (B,))`` batches from a Dataset (optionally ``indices``) or a loader."""
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        idx = list(range(len(data))) if indices is None else [int(i) for i in indices]
        n = len(data)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise UserError(f"image index {bad[0]} is out of range for a dataset of {n} images")
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            if hasattr(data, "get_batch"):
                x, y = data.get_batch(chunk, device)
            else:
                items = [data[i] for i in chunk]
                x = torch.stack([torch.as_tensor(a) for a, _ in items])
                y = torch.as_tensor([int(b) for _, b in items])
            yield x.to(device).float(), y.to(device).long()
    else:
        if indices is not None:
            raise UserError("indices can only be given with a dataset, not with a data loader")
        for x, y in data:
            yield x.to(device).float(), torch.as_tensor(y).to(device).long()


def _resolve_attack(attack: str | Attack, eps: float, steps: int | None, **kw) -> Attack:
    if callable(attack):
        return attack
    if attack not in ATTACKS:
        raise UserError(f"unknown attack '{attack}'; choose from: {', '.join(ATTACKS)}")
    if attack == "apgd-l2":
        steps = 100 if steps is None else steps
        return lambda f, x, y: autopgd_l2(f, x, y, eps, steps, n_restarts=kw["n_restarts"], seed=kw["seed"])
    if attack == "pgd-l2":
        steps = 20 if steps is None else steps
        return lambda f, x, y: pgd_l2(f, x, y, eps, steps, step_size=kw["step_size"], seed=kw["seed"])
    raise AssertionError(attack)


def robust_accuracy(
    model: nn.Module,
    data,
    attack: str | Attack = "apgd-l2",
    eps: float = 0.5,
    steps: int | None = None,
    *,
    batch_size: int = 100,
    indices: Sequence[int] | None = None,
    n_restarts: int = 1,
    step_size: float | None = None,
    seed: int = 0,
    sigma: float | None = None,
    m: int = 16,
    n: int = 1000,
    alpha: float = 0.001,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Standard and robust accuracy under an L2 attack of radius ``eps``.

    ``data``: a dataset (``__getitem__ -> (x (C,H,W), y)``; ``indices`` selects images) or an iterable of
    ``(x (B,C,H,W), y (B,))`` batches. ``attack``: ``'apgd-l2'`` (default 100 steps), ``'pgd-l2'`` (default 20
    steps), ``'smoothed-pgd'`` or a callable ``(model, x, y) -> x_adv``.

    Base-classifier attacks: SA = fraction classified correctly, RA = fraction classified correctly both at
    ``x`` and at ``x_adv`` (the robust accuracy of Croce & Hein's AutoAttack evaluation).

    ``'smoothed-pgd'`` evaluates the smoothed classifier ``g`` at noise ``sigma`` instead (Salman et al.,
    2019, empirical robust accuracy): ``x_adv`` = :func:`smoothed_pgd` with ``m`` noise samples per step
    (default 20 steps), and SA/RA use ``Smooth.predict(n, alpha)``; abstentions count as wrong.

    Returns ``{"standard_acc", "robust_acc", "n"}`` (plus ``"abstain_clean"``/``"abstain_adv"`` for smoothed).
    """
    eps = _check_eps(eps)
    batch_size = check_pos_int(batch_size, "batch_size")
    if steps is not None:
        steps = check_pos_int(steps, "steps")
    k = check_classifier(model, num_classes)
    device = device_of(model)
    smoothed = attack == "smoothed-pgd"
    if smoothed:
        if sigma is None:
            raise UserError("the smoothed-pgd attack needs sigma (the smoothing noise level)")
        if k is None:
            raise UserError("smoothed-pgd needs num_classes (the model has no spec)")

        smooth = Smooth(model, k, sigma, fast=False)  # the float32 model the attack differentiates
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)
        t_steps = 20 if steps is None else steps
        run_attack = None
    else:
        run_attack = _resolve_attack(
            attack, eps, steps, n_restarts=n_restarts, step_size=step_size, seed=seed
        )
    total = clean_ok = robust_ok = abst_clean = abst_adv = 0
    batches = iter_batches(data, batch_size, indices, device)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"attack {attack if isinstance(attack, str) else 'custom'}", leave=False)
    for x, y in batches:
        if smoothed:
            x_adv = smoothed_pgd(
                model, x, y, sigma, eps, t_steps, m, step_size=step_size, generator=generator
            )
            for i in range(x.shape[0]):
                pc = smooth.predict(x[i], n, alpha, batch_size, generator=generator)
                pa = smooth.predict(x_adv[i], n, alpha, batch_size, generator=generator)
                abst_clean += pc == ABSTAIN
                abst_adv += pa == ABSTAIN
                clean_ok += pc == int(y[i])
                robust_ok += pc == int(y[i]) and pa == int(y[i])
        else:
            with torch.no_grad(), eval_mode(model):
                c = model(x).argmax(1) == y
            x_adv = run_attack(model, x, y)
            with torch.no_grad(), eval_mode(model):
                a = model(x_adv).argmax(1) == y
            clean_ok += int(c.sum())
            robust_ok += int((c & a).sum())
        total += x.shape[0]
    if total == 0:
        raise UserError("no images to attack")
    out: dict[str, Any] = {"standard_acc": clean_ok / total, "robust_acc": robust_ok / total, "n": total}
    if smoothed:
        out.update(abstain_clean=abst_clean / total, abstain_adv=abst_adv / total)
    return out


def certificate_check(
    model: nn.Module,
    dataset,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    indices: Sequence[int] | None = None,
    steps: int = 20,
    m: int = 32,
    generator: torch.Generator | None = None,
    *,
    eps_fraction: float = 0.9,
    num_classes: int | None = None,
    smooth_factory: Callable[..., Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Try to falsify randomized-smoothing certificates (Cohen et al., 2019) with the SmoothAdv attack.

    For each image certified as ``(c_A, R)`` with ``R > 0`` by ``Smooth.certify(n0, n, alpha)``, run
    :func:`smoothed_pgd` against ``c_A`` at ``eps = eps_fraction * R`` (inside the certified ball), then
    ``Smooth.predict(x_adv, n, alpha)``. A prediction that is neither ``c_A`` nor ABSTAIN is a **violation**,
    logged with ``logging.error`` and summarised with a warning; abstentions are not violations.

    A certificate fails with probability ``<= alpha`` and PREDICT errs with probability ``<= alpha``, so a
    sound implementation shows violations on at most about ``2 * alpha`` of the checked images in expectation;
    more points at a bug (noise after normalisation, reused selection samples, a wrong bound ...).

    Returns ``{"images", "certified", "checked", "violations", "abstained", "rows"}``: ``certified`` images
    with ``R > 0``, ``checked`` of them attacked and re-predicted (all of them), ``abstained`` adversarial
    predictions that abstained, and one row per image (``idx, label, prediction, radius, eps, adv_prediction,
    adv_distance, violation``).
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma}")
    if not 0 < eps_fraction < 1:
        raise UserError(f"eps_fraction must lie strictly between 0 and 1, got {eps_fraction}")
    steps = check_pos_int(steps, "steps")
    m = check_pos_int(m, "m (noise samples per step)")
    info = getattr(dataset, "info", None)
    k = check_classifier(
        model, num_classes if num_classes is not None else getattr(info, "num_classes", None)
    )
    if k is None:
        raise UserError("certificate_check needs num_classes (the model has no spec and the dataset no info)")
    device = device_of(model)
    # fast=False by default: certify and predict the float32 model the attack differentiates
    smooth = smooth_factory(model, k, sigma) if smooth_factory else Smooth(model, k, sigma, fast=False)
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    counts = {"images": 0, "certified": 0, "checked": 0, "violations": 0, "abstained": 0}
    rows: list[dict[str, Any]] = []
    it = idx
    if progress:
        from tqdm import tqdm

        it = tqdm(idx, desc="certificate check", leave=False)
    t0 = time.time()
    for i in it:
        x, label = dataset[i]
        x = torch.as_tensor(x).to(device).float()
        pred, radius = smooth.certify(x, n0, n, alpha, batch_size, generator=generator)
        counts["images"] += 1
        row: dict[str, Any] = {
            "idx": i,
            "label": int(label),
            "prediction": int(pred),
            "radius": float(radius),
        }
        if pred == ABSTAIN or not radius > 0:
            rows.append(row)
            continue
        counts["certified"] += 1
        eps = eps_fraction * radius
        y = torch.tensor([int(pred)], device=device)
        x_adv = smoothed_pgd(model, x[None], y, sigma, eps, steps, m, generator=generator)[0]
        adv = smooth.predict(x_adv, n, alpha, batch_size, generator=generator)
        counts["checked"] += 1
        violation = adv != ABSTAIN and adv != pred
        counts["abstained"] += adv == ABSTAIN
        counts["violations"] += violation
        row.update(
            eps=eps, adv_prediction=int(adv), adv_distance=float((x_adv - x).norm()), violation=violation
        )
        rows.append(row)
        if violation:
            log.error(
                "CERTIFICATE VIOLATION: image %d certified as class %d at radius %.4f, but the smoothed "
                "classifier predicts %d at L2 distance %.4f",
                i,
                pred,
                radius,
                adv,
                row["adv_distance"],
            )
    if counts["violations"]:
        expected = 2 * alpha * max(counts["checked"], 1)
        warnings.warn(
            f"certificate check: {counts['violations']} violation(s) among {counts['checked']} checked "
            f"certificates (a sound implementation expects about <= {expected:.3g})",
            stacklevel=2,
        )
    counts["seconds"] = time.time() - t0
    counts["rows"] = rows
    return counts
