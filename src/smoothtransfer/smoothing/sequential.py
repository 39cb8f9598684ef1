"""Sample-saving certification on a fixed grid of radii with an anytime-valid bound (soundness rule 10).

Certified accuracy is usually reported on a grid of radii ``r_1 < ... < r_m``; at noise level ``sigma`` the
smoothed classifier is certified at ``r_j`` iff ``p_A >= t_j := Phi(r_j / sigma)``. For an easy image (all
votes agree) a few thousand samples already decide every grid radius that ``n_max`` samples could ever
certify, so drawing all ``n_max`` (Cohen et al. use 100k) is wasted work. :func:`certify_sequential` draws
the estimation samples in stages and stops as soon as every grid radius is decided.

Why it is valid (multi-stage test, Bonferroni over stages)
---------------------------------------------------------
The stage sizes ``n_1 < n_2 < ... < n_S = n_max`` and levels ``beta_1 + ... + beta_S = alpha`` are fixed
*before* sampling (:func:`plan_stages`; they depend on ``n_max``, ``alpha`` and the grid, nothing random).
``c_A`` is chosen from ``n0`` separate selection draws, so given ``c_A`` the estimation votes are i.i.d.
Bernoulli(``p_A``) and ``k_s ~ Bin(n_s, p_A)`` for each fixed ``s``. Let ``L_s`` be the one-sided
Clopper-Pearson lower bound of ``k_s`` out of ``n_s`` at level ``beta_s``; then ``P(L_s > p_A) <= beta_s``
and by the union bound ``P(exists s: L_s > p_A) <= sum_s beta_s = alpha``. On the complementary event
(probability ``>= 1 - alpha``) *every* stage's bound, and hence their running maximum ``p_lower = max_s L_s``,
is ``<= p_A`` simultaneously — whichever stage the data-dependent stopping rule ends at. That is why peeking
is allowed here while a fixed-``n`` bound at level ``alpha`` re-evaluated after each stage is not. So with
probability ``>= 1 - alpha`` the returned class ``c_A`` (when not abstaining) is robust at
``radius = sigma * Phi^{-1}(p_lower)`` and at every grid radius marked certified.

Stopping for *futility* ("give up ``r_j``") can never make a certificate unsound — it only gives up — so
the futility rule is free to be aggressive; what it trades is agreement with fixed-``N`` CERTIFY, not
validity. Two rules: "hopeless" (even if every remaining sample voted for ``c_A`` the final stage could not
certify ``r_j``), and predictive futility (stochastic curtailment): with ``p`` the optimistic
Clopper-Pearson *upper* bound on ``p_A`` at level ``futility_level``, the probability that the final stage
would still certify ``r_j`` is below ``futility``.

The schedule (:func:`plan_stages`) spends half of ``alpha`` on the final stage ``n_max`` — a hard image
that needs every sample then loses almost nothing against fixed-``N`` CERTIFY at ``alpha`` — and splits the
other half evenly over the early stages: a geometric series from ``n_first`` plus, for each grid radius,
the stage at which unanimous votes first certify it (for ``r = 3 sigma`` at ``alpha = 0.001`` that is ~7.5k
samples, where a plain doubling schedule would wait for 12.8k).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import binom

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing.checks import ABSTAIN, check_alpha, positive_int
from smoothtransfer.smoothing.sampling import NoiseStream, eval_mode
from smoothtransfer.smoothing.stats import (
    certified_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
)

if TYPE_CHECKING:  # smooth.py imports this module (Smooth.certify_sequential); only the annotation needs Smooth
    from smoothtransfer.smoothing.smooth import Smooth

__all__ = ["SequentialCertificate", "StagePlan", "certify_sequential", "plan_stages", "sequential_decide",
           "stage_sizes"]


@dataclass(frozen=True)
class SequentialCertificate:
    """Result of :func:`certify_sequential` for one image.

    Attributes:
        prediction: ``c_A`` or :data:`ABSTAIN` (when the final ``p_lower < 1/2``).
        radius: ``sigma * Phi^{-1}(p_lower)`` from the anytime-valid bound; 0.0 when abstaining. At least the
            largest certified grid radius; valid at the same level ``alpha``.
        grid_radius: the largest grid radius marked certified, or None if none is.
        p_lower: running maximum over the stages run of the Clopper-Pearson bounds at ``alpha / num_stages``.
        count: votes for ``c_A`` among the ``n_used`` estimation samples.
        n_used: estimation samples drawn (the ``n0`` selection samples come on top).
        n0, n_max, alpha, sigma: parameters; ``num_stages`` is the Bonferroni divisor ``S``.
        radii: the grid; ``certified[j]`` is True iff the grid radius ``radii[j]`` is certified.
        stages_run: number of stages drawn before stopping.
    """

    prediction: int
    radius: float
    grid_radius: float | None
    p_lower: float
    count: int
    n_used: int
    n0: int
    n_max: int
    alpha: float
    sigma: float
    num_stages: int
    stages_run: int
    radii: tuple[float, ...]
    certified: tuple[bool, ...]

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_sizes(n_max: int, n_first: int = 100, growth: float = 2.0) -> list[int]:
    """Cumulative sample sizes ``n_1 < ... < n_S = n_max``: ``n_s = ceil(n_first * growth**(s-1))``, capped.

    >>> stage_sizes(1000, 100, 2.0)
    [100, 200, 400, 800, 1000]
    """
    n_max, n_first = positive_int(n_max, "n_max"), positive_int(n_first, "n_first")
    if not (isinstance(growth, int | float) and growth > 1 and math.isfinite(growth)):
        raise UserError(f"growth must be a number > 1, got {growth}")
    sizes, s = [], 0
    while True:
        size = min(n_max, math.ceil(n_first * growth**s))
        if not sizes or size > sizes[-1]:
            sizes.append(size)
        if size >= n_max:
            return sizes
        s += 1


def _check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    try:
        grid = tuple(float(r) for r in radii)
    except (TypeError, ValueError):
        raise UserError(f"radii must be a list of numbers, got {radii!r}") from None
    if not grid:
        raise UserError("the grid of radii is empty")
    if any(not math.isfinite(r) or r < 0 for r in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
        raise UserError(f"radii must be finite, >= 0 and strictly increasing, got {list(grid)}")
    return grid


@dataclass(frozen=True)
class StagePlan:
    """Cumulative stage sizes ``n_1 < ... < n_S = n_max`` and Clopper-Pearson levels ``beta_s`` (sum ``alpha``).

    Fixed before any sample is drawn; the union bound over stages makes the running maximum of the stage
    bounds a valid lower confidence bound at level ``alpha`` whatever stage the procedure stops at.
    """

    sizes: tuple[int, ...]
    betas: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.sizes)


def _unanimous_size(beta: float, t: float) -> int:
    """Smallest ``n`` whose unanimous vote certifies threshold ``t``: ``beta**(1/n) >= t``."""
    if t <= 0:
        return 1
    return max(1, math.ceil(math.log(beta) / math.log(t) - 1e-12))


@functools.lru_cache(maxsize=256)
def _plan(n_max: int, alpha: float, thresholds: tuple[float, ...], n_first: int, growth: float,
          final_share: float) -> StagePlan:
    early = [n for n in stage_sizes(n_max, n_first, growth) if n < n_max]
    if not early:
        return StagePlan((n_max,), (alpha,))
    alpha_early = alpha * (1.0 - final_share)
    sizes = early
    for _ in range(20):  # the unanimous-vote stages depend on beta, which depends on the number of stages
        beta = alpha_early / len(sizes)
        extra = [_unanimous_size(beta, t) for t in thresholds if 0 < t < 1]
        new = sorted(set(early) | {n for n in extra if n_first < n < n_max})  # no stage below n_first
        if new == sizes:
            break
        sizes = new
    beta = alpha_early / len(sizes)  # valid for any sizes: the levels sum to alpha
    return StagePlan((*sizes, n_max), (beta,) * len(sizes) + (alpha * final_share,))


def plan_stages(n_max: int, alpha: float, thresholds: Sequence[float] = (), *, n_first: int = 100,
                growth: float = 2.0, final_share: float = 0.5) -> StagePlan:
    """The stage schedule of :func:`certify_sequential`.

    Early stages: :func:`stage_sizes` ``(n_max, n_first, growth)`` below ``n_max``, plus for each threshold
    ``t_j = Phi(r_j / sigma)`` the size at which unanimous votes first certify it (if above ``n_first``: the
    first stage is never smaller, since every stage costs a share of alpha); they share
    ``(1 - final_share) * alpha`` evenly. The final stage ``n_max`` gets ``final_share * alpha``. With no
    early stage (``n_max <= n_first``) the single stage gets all of ``alpha``.

    >>> plan_stages(1000, 0.01, n_first=100).sizes
    (100, 200, 400, 800, 1000)
    """
    n_max, n_first = positive_int(n_max, "n_max"), positive_int(n_first, "n_first")
    alpha = check_alpha(alpha)
    if not (isinstance(final_share, int | float) and 0 < final_share < 1):
        raise UserError(f"final_share must lie strictly between 0 and 1, got {final_share}")
    stage_sizes(n_max, n_first, growth)  # validates growth
    ts = tuple(sorted({round(float(t), 15) for t in thresholds}))
    return _plan(n_max, alpha, ts, n_first, float(growth), float(final_share))


@functools.lru_cache(maxsize=1024)
def _final_k(n_max: int, beta: float, t: float) -> int:
    """Smallest count ``k`` with ``clopper_pearson_lower(k, n_max, beta) >= t`` (``n_max + 1`` if none)."""
    if clopper_pearson_lower(n_max, n_max, beta) < t:
        return n_max + 1
    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi) // 2
        if clopper_pearson_lower(mid, n_max, beta) >= t:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class _Decision:
    count: int
    n_used: int
    stages_run: int
    p_lower: float
    certified_upto: int


def sequential_decide(draw: Callable[[int], int], plan: StagePlan, thresholds: Sequence[float], *,
                      futility: float = 0.01, futility_level: float = 0.01) -> _Decision:
    """The stopping rule of :func:`certify_sequential`, separated from sampling.

    Args:
        draw: ``draw(m)`` draws ``m`` fresh estimation samples and returns how many voted for ``c_A``.
        plan: the stage schedule (:func:`plan_stages`).
        thresholds: ``t_j = Phi(r_j / sigma)``, non-decreasing.
        futility: give up ``r_j`` when the final stage would certify it with probability below this
            (at ``p_A`` = its upper confidence bound at level ``futility_level``); 0 keeps only "hopeless".

    Used by the benchmark to replay recorded votes through exactly the code that certifies.
    """
    t = np.asarray(thresholds, dtype=np.float64)
    n_max, beta_final = plan.sizes[-1], plan.betas[-1]
    k_final = [_final_k(n_max, beta_final, float(tj)) for tj in t]
    # Radii no stage could certify even with unanimous votes are decided "not certified" from the start.
    best = max(b ** (1.0 / n) for n, b in zip(plan.sizes, plan.betas))
    given_up_from = int(np.searchsorted(t, best, side="right"))
    certified_upto, p_lower, count, n_used, stages_run = -1, 0.0, 0, 0, 0
    for size, beta in zip(plan.sizes, plan.betas):
        if stages_run > 0 and certified_upto + 1 >= given_up_from:
            break  # every grid radius decided (one stage always runs, so the prediction means something)
        # Fresh estimation samples for this stage only; earlier stages' votes are kept (cumulative n_s).
        count += int(draw(size - n_used))
        n_used, stages_run = size, stages_run + 1
        p_lower = max(p_lower, float(clopper_pearson_lower(count, n_used, beta)))
        certified_upto = max(certified_upto, int(np.searchsorted(t, p_lower, side="right")) - 1)
        if n_used >= n_max:
            break
        remaining = n_max - n_used
        upper = float(clopper_pearson_upper(count, n_used, futility_level)) if futility > 0 else 1.0
        for j in range(certified_upto + 1, given_up_from):
            need = k_final[j] - count  # votes the remaining samples must bring for the final stage
            if need > remaining or (futility > 0 and need > 0 and binom.sf(need - 1, remaining, upper) < futility):
                given_up_from = j  # thresholds increase: every larger radius is even further out of reach
                break
        given_up_from = max(certified_upto + 1, given_up_from)
    return _Decision(count, n_used, stages_run, p_lower, certified_upto)


def certify_sequential(smooth: Smooth, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                       radii: Sequence[float], *, n_first: int = 100, growth: float = 2.0,
                       final_share: float = 0.5, futility: float = 0.01, futility_level: float = 0.01,
                       generator: torch.Generator | None = None) -> SequentialCertificate:
    """Certify ``x`` on the grid ``radii`` with at most ``n_max`` estimation samples, stopping early.

    Args:
        smooth: the smoothed classifier (base classifier, ``num_classes``, ``sigma``, ``amp_dtype``).
        x: image ``(C,H,W)`` in [0,1] on the base classifier's device.
        n0: selection samples for choosing ``c_A`` (independent of the estimation samples).
        n_max: the most estimation samples to draw (the last stage).
        alpha: failure probability of the whole certificate, split over the stages (:func:`plan_stages`).
        batch_size: samples per forward pass (does not change the result under a seeded generator).
        radii: grid ``r_1 < ... < r_m`` (>= 0) on which certified accuracy will be reported.
        n_first, growth, final_share: the stage schedule, see :func:`plan_stages`.
        futility, futility_level: the predictive futility rule (see the module docstring); they change how
            soon a radius is given up, never the validity of a certificate.
        generator: optional seeded ``torch.Generator`` on ``x``'s device type. The estimation samples are
            the continuation of the same stream as fixed-``N`` CERTIFY's: under one seed, stage ``s`` sees
            exactly the first ``n_s`` of the ``N`` estimation samples ``certify_full`` would draw.

    Returns:
        :class:`SequentialCertificate`. Stops after the first stage at which every grid radius is decided;
        one host sync per stage.
    """
    if not all(hasattr(smooth, a) for a in ("check_input", "counts", "base_classifier", "sigma")):  # a Smooth
        raise UserError(f"certify_sequential needs a Smooth, got {type(smooth).__name__}")
    x = smooth.check_input(x)
    n0, n_max = positive_int(n0, "n0"), positive_int(n_max, "n_max")
    alpha = check_alpha(alpha)
    grid = _check_radii(radii)
    for name, v in (("futility", futility), ("futility_level", futility_level)):
        if not (isinstance(v, int | float) and 0 <= v < 1):
            raise UserError(f"{name} must lie in [0, 1), got {v}")
    if futility > 0 and futility_level <= 0:
        raise UserError("futility_level must be > 0 when futility > 0")
    sigma = smooth.sigma
    thresholds = [0.5 * math.erfc(-r / sigma / math.sqrt(2)) for r in grid]  # Phi(r / sigma)
    plan = plan_stages(n_max, alpha, thresholds, n_first=n_first, growth=growth, final_share=final_share)

    with eval_mode(smooth.base_classifier):
        counts0 = smooth.counts(x, n0, batch_size, generator)
        c_a = int(counts0.argmax())  # needed on the host for every stage's decision anyway
        # One noise stream for all stages: stage s sees the first n_s of certify_full's estimation samples.
        stream = NoiseStream(tuple(x.shape), x.device, generator)

        def draw(num: int) -> int:
            return int(smooth.counts(x, num, batch_size, stream)[c_a])  # one host sync per stage

        d = sequential_decide(draw, plan, thresholds, futility=futility, futility_level=futility_level)

    certified = tuple(j <= d.certified_upto for j in range(len(grid)))
    grid_radius = grid[d.certified_upto] if d.certified_upto >= 0 else None
    if d.p_lower < 0.5:
        prediction, radius = ABSTAIN, 0.0
    else:
        prediction, radius = c_a, float(certified_radius(sigma, d.p_lower))
    return SequentialCertificate(prediction, radius, grid_radius, d.p_lower, d.count, d.n_used, n0, n_max, alpha,
                                 sigma, plan.num_stages, d.stages_run, grid, certified)
