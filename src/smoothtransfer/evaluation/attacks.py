"""Empirical L2 robustness: attacks on the base classifier and on the smoothed classifier.

* :func:`pgd_l2` — PGD-L2 (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial
  Attacks") and :func:`autopgd_l2` — AutoPGD-L2 (Croce & Hein, 2020, "Reliable evaluation of adversarial
  robustness with an ensemble of diverse parameter-free attacks"), both from ``torchattacks``. The empirical
  robust accuracy of "A Study of the Effects of Transfer Learning on Adversarial Robustness" is AutoPGD-L2 at
  eps = 0.5.
* :func:`smoothed_pgd` — PGD-L2 on the soft smoothed classifier (Salman et al., 2019, "Provably Robust Deep
  Learning via Adversarially Trained Smoothed Classifiers", the SmoothAdv attack; ``torchattacks.PGDRSL2``).
* :func:`certificate_check` — an empirical falsification test of certificates: attack every certified image
  inside its certified ball and check that the smoothed classifier still predicts the certified class.

Models take ``(B,C,H,W)`` images in [0,1] (the input normalisation is their first layer), which is
torchattacks' expected input range, and return logits ``(B,K)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from smoothtransfer.errors import UserError

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


def _check_pos_int(value: Any, name: str) -> int:
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


def _device_of(model: nn.Module) -> torch.device:
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


@contextlib.contextmanager
def _eval_and_seed(model: nn.Module, seed: int | None, device: torch.device):
    """Eval mode (each module's flag restored afterwards) and, with a seed, a private RNG state.

    torchattacks draws random starts from torch's global RNG, and APGD even calls ``torch.manual_seed``
    itself; forking the RNG keeps attacks reproducible without changing the caller's random stream.
    """
    flags = [(m, m.training) for m in model.modules()]
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _seed_from(generator: torch.Generator | None) -> int | None:
    """A seed drawn from ``generator`` (None for None), for library code that only uses the global RNG."""
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _setup(attack, x: torch.Tensor):
    # torchattacks guesses the device from the model's first parameter; the input's device is authoritative.
    attack.set_device(x.device)
    return attack


# ------------------------------------------------------------------------------------------------------
# attacks on the base classifier


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """PGD-L2 (Madry et al., 2018) via ``torchattacks.PGDL2``: the last iterate, ``(B,C,H,W)`` in [0,1].

    ``x``: ``(B,C,H,W)`` in [0,1]; ``y``: ``(B,)`` true labels (cross-entropy is maximised). ``step_size``
    defaults to ``2.5 * eps / steps`` (Madry et al.'s rule, so that the ball's boundary is reachable from any
    start). Every ``x_adv - x`` has L2 norm ``<= eps`` (per image) and ``x_adv`` stays in [0,1].
    """
    import torchattacks

    eps = _check_eps(eps)
    steps = _check_pos_int(steps, "steps")
    _check_batch(x, y)
    step_size = 2.5 * eps / steps if step_size is None else _check_eps(step_size)
    with _eval_and_seed(model, seed, x.device):
        atk = _setup(
            torchattacks.PGDL2(model, eps=eps, alpha=step_size, steps=steps, random_start=random_start), x
        )
        return atk(x, y).detach()


def autopgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 0.5,
    steps: int = 100,
    n_restarts: int = 1,
    loss: str = "ce",
    seed: int = 0,
) -> torch.Tensor:
    """AutoPGD-L2 (Croce & Hein, 2020) via ``torchattacks.APGD(norm='L2')``, ``(B,C,H,W)`` in [0,1].

    Only images the model classifies correctly are attacked; for each the first successful restart's point is
    returned, otherwise ``x`` itself. ``loss``: ``'ce'`` or ``'dlr'``. ``seed`` fixes the random starts (the
    caller's global RNG state is left untouched).
    """
    import torchattacks

    eps = _check_eps(eps)
    steps = _check_pos_int(steps, "steps")
    n_restarts = _check_pos_int(n_restarts, "n_restarts")
    if loss not in ("ce", "dlr"):
        raise UserError(f"autopgd loss must be 'ce' or 'dlr', got {loss!r}")
    _check_batch(x, y)
    with _eval_and_seed(model, None, x.device):
        atk = _setup(
            torchattacks.APGD(
                model, norm="L2", eps=eps, steps=steps, n_restarts=n_restarts, seed=int(seed), loss=loss
            ),
            x,
        )
        return atk(x, y).detach()


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

    Maximises ``-log( (1/m) sum_i softmax(f(clip(x') + delta_i))_y )`` over ``||x' - x||_2 <= eps`` with
    normalised-gradient steps, starting at ``x``, via ``torchattacks.PGDRSL2``. The ``m`` noise samples
    ``delta_i ~ N(0, sigma^2 I)`` are drawn **afresh at every step** (an expectation-over-transformation
    estimate, as in torchattacks and Salman et al.'s evaluation code), so over ``steps`` steps the attack sees
    ``steps * m`` noise draws. ``step_size`` defaults to ``2 * eps / steps`` (Salman et al.'s setting).
    ``generator`` seeds the noise (the global RNG is not disturbed). ``batch_max`` caps ``B * m`` per forward.
    """
    import torchattacks

    eps = _check_eps(eps)
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma}")
    steps = _check_pos_int(steps, "steps")
    m = _check_pos_int(m, "m (noise samples per step)")
    _check_batch(x, y)
    step_size = 2.0 * eps / steps if step_size is None else _check_eps(step_size)
    with _eval_and_seed(model, _seed_from(generator), x.device):
        atk = _setup(
            torchattacks.PGDRSL2(
                model,
                eps=eps,
                alpha=step_size,
                steps=steps,
                noise_type="guassian",
                noise_sd=sigma,
                noise_batch_size=m,
                batch_max=max(int(batch_max), m),
            ),
            x,
        )
        return atk(x, y).detach()


# ------------------------------------------------------------------------------------------------------
# dataset-level evaluation


def _batches(
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
    batch_size = _check_pos_int(batch_size, "batch_size")
    if steps is not None:
        steps = _check_pos_int(steps, "steps")
    k = check_classifier(model, num_classes)
    device = _device_of(model)
    smoothed = attack == "smoothed-pgd"
    if smoothed:
        if sigma is None:
            raise UserError("the smoothed-pgd attack needs sigma (the smoothing noise level)")
        if k is None:
            raise UserError("smoothed-pgd needs num_classes (the model has no spec)")
        from smoothtransfer.smoothing.smooth import ABSTAIN, Smooth

        smooth = Smooth(model, k, sigma)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)
        t_steps = 20 if steps is None else steps
        run_attack = None
    else:
        run_attack = _resolve_attack(
            attack, eps, steps, n_restarts=n_restarts, step_size=step_size, seed=seed
        )
    total = clean_ok = robust_ok = abst_clean = abst_adv = 0
    batches = _batches(data, batch_size, indices, device)
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
            with torch.no_grad(), _eval_and_seed(model, None, device):
                c = model(x).argmax(1) == y
            x_adv = run_attack(model, x, y)
            with torch.no_grad(), _eval_and_seed(model, None, device):
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
    from smoothtransfer.smoothing.smooth import ABSTAIN, Smooth

    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise UserError(f"sigma must be a positive number, got {sigma}")
    if not 0 < eps_fraction < 1:
        raise UserError(f"eps_fraction must lie strictly between 0 and 1, got {eps_fraction}")
    steps = _check_pos_int(steps, "steps")
    m = _check_pos_int(m, "m (noise samples per step)")
    info = getattr(dataset, "info", None)
    k = check_classifier(
        model, num_classes if num_classes is not None else getattr(info, "num_classes", None)
    )
    if k is None:
        raise UserError("certificate_check needs num_classes (the model has no spec and the dataset no info)")
    device = _device_of(model)
    smooth = (smooth_factory or Smooth)(model, k, sigma)
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
