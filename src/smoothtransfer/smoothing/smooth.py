"""The smoothed classifier ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``.

:class:`Smooth` implements PREDICT and CERTIFY of Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial
Robustness via Randomized Smoothing", Algorithm/Section 3.2:

* CERTIFY draws ``n0`` *selection* samples to guess the top class ``c_A``, then ``n`` *fresh, independent*
  estimation samples (soundness rule 2), bounds ``p_A`` from below with the one-sided Clopper-Pearson bound
  at level ``alpha`` and returns radius ``sigma * Phi^{-1}(p_lower)``, or abstains when ``p_lower < 1/2``.
  With probability ``>= 1 - alpha`` over the noise, a non-abstaining answer ``(c_A, R)`` is correct: ``g``
  predicts ``c_A`` everywhere within L2 distance ``R`` of ``x``.
* PREDICT draws ``n`` samples and returns the top class unless a two-sided binomial test of the top two
  counts has p-value ``> alpha``; it returns a wrong (non-abstain) answer with probability ``<= alpha``.

Each call performs exactly one device-to-host transfer (the final counts), whatever ``n`` and the batch size.

By default (``fast=True``) the base classifier is wrapped by :func:`smoothtransfer.smoothing.fast.prepare`:
channels_last weights, cache-sized micro-batches on CPUs, bf16 autocast where the hardware has bf16 matrix
units (``amp_dtype="auto"``), the same speed-ups as ``smoothtransfer certify``; ``batch_size`` may be left out
(None: chosen for the device). Noise is still drawn and added in float32; the cast is part of the base
classifier, so certificates are as sound as in float32, for the (possibly bf16) base classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from smoothtransfer.errors import UserError
from smoothtransfer.smoothing import sequential
from smoothtransfer.smoothing.checks import ABSTAIN, check_alpha, positive_int
from smoothtransfer.smoothing.fast import AMP_AUTO, FastClassifier, prepare, resolve_amp
from smoothtransfer.smoothing.sampling import auto_batch_size, eval_mode, sample_counts, sample_counts_multi
from smoothtransfer.smoothing.stats import binom_pvalue, certified_radius, clopper_pearson_lower

__all__ = ["ABSTAIN", "Certificate", "Smooth"]

#: The smallest noise level accepted: float32's machine epsilon. Noise is drawn in float32 and added to pixels
#: in [0,1]; below this, sigma * z is mostly lost to rounding (1e-300 even rounds to 0.0 in float32), so the
#: "smoothed" classifier is the base classifier and a certificate would describe noise that was never added.
MIN_SIGMA = float(torch.finfo(torch.float32).eps)


def sigma_too_small(sigma: float, flag: str = "--sigma") -> str | None:
    """The one-line complaint about a positive ``sigma`` below :data:`MIN_SIGMA` (None when it is fine)."""
    if 0 < sigma < MIN_SIGMA:
        return (f"{flag} {sigma:g} is too small: noise below {MIN_SIGMA:.3g} (float32 epsilon) is lost to rounding "
                "at [0,1] pixel scale, so nothing would be smoothed")
    return None


@dataclass(frozen=True)
class Certificate:
    """The result of :meth:`Smooth.certify_full` for one image, with everything needed to report it.

    Attributes:
        prediction: ``c_A``, or :data:`ABSTAIN`.
        radius: certified L2 radius ``sigma * Phi^{-1}(p_lower)``; 0.0 when abstaining.
        p_lower: one-sided Clopper-Pearson lower bound on ``p_A`` at level ``alpha``.
        count: votes for the selected class ``c_A`` among the ``n`` estimation samples.
        n0, n, alpha, sigma: the parameters the certificate holds for (soundness rule 4).
    """

    prediction: int
    radius: float
    p_lower: float
    count: int
    n0: int
    n: int
    alpha: float
    sigma: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Smooth:
    """Smoothed classifier around ``base_classifier`` at noise level ``sigma``.

    Args:
        base_classifier: ``nn.Module`` mapping ``(B,C,H,W)`` images in [0,1] plus noise to logits
            ``(B, num_classes)``; its first layer is the input normalisation (soundness rule 1). It is run in
            eval mode during every call and its train/eval flags are restored afterwards.
        num_classes: number of classes ``K`` (>= 2).
        sigma: noise standard deviation in [0,1] pixel units (> 0).
        amp_dtype: ``"auto"`` (default: bf16 where the device has bf16 matrix units, i.e. CPUs with AMX-BF16
            and CUDA devices, else float32; float32 with ``fast=False``), ``torch.bfloat16``/``torch.float16``
            to run the base classifier under autocast, or None / ``torch.float32`` for float32, the same
            results on every machine. The noisy input is formed in float32 either way and the cast is part
            of the base classifier (rule 6).
        fast: wrap the base classifier with :func:`smoothtransfer.smoothing.fast.prepare` (channels_last
            weights, in place; cache-sized micro-batches on CPUs; the autocast above). ``False`` runs the
            module exactly as given. :attr:`base_classifier` is then the wrapper; a base classifier that
            already is one (``prepare(model, compile=True)``) is used as it is.
    """

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, *,
                 amp_dtype: torch.dtype | str | None = AMP_AUTO, fast: bool = True) -> None:
        if not isinstance(base_classifier, nn.Module):
            raise UserError(f"base_classifier must be a torch.nn.Module, got {type(base_classifier).__name__}")
        self.num_classes = positive_int(num_classes, "num_classes")
        if self.num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {self.num_classes}")
        try:
            self.sigma = float(sigma)
        except (TypeError, ValueError):
            raise UserError(f"sigma must be a positive number, got {sigma!r}") from None
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise UserError(f"sigma must be a positive number, got {sigma}")
        if sigma_too_small(self.sigma, "sigma"):
            raise UserError(sigma_too_small(self.sigma, "sigma"))
        if not isinstance(fast, bool):
            raise UserError(f"fast must be True or False, got {fast!r}")
        if fast:
            if isinstance(base_classifier, FastClassifier):
                if amp_dtype != AMP_AUTO and resolve_amp(amp_dtype, "cpu") != base_classifier.amp_dtype:
                    raise UserError(f"the prepared base classifier runs in {base_classifier.amp_dtype}, not "
                                    f"{amp_dtype}; choose amp in prepare()")
            else:
                base_classifier = prepare(base_classifier, amp=amp_dtype)
            # The wrapper casts inside its forward; sampling itself adds no autocast.
            self.amp_dtype = base_classifier.amp_dtype
            self._sampling_amp = None
        else:
            device = next(base_classifier.parameters(), torch.empty(0)).device
            self.amp_dtype = None if amp_dtype == AMP_AUTO else resolve_amp(amp_dtype, device)
            self._sampling_amp = self.amp_dtype
        self.base_classifier = base_classifier
        self.fast = fast
        self._batch_sizes: dict[tuple, int] = {}

    def __repr__(self) -> str:
        return (f"Smooth({type(self.base_classifier).__name__}, num_classes={self.num_classes}, "
                f"sigma={self.sigma}, amp_dtype={self.amp_dtype}, fast={self.fast})")

    # -- helpers -------------------------------------------------------------------------------------------
    def check_input(self, x: Any) -> torch.Tensor:
        """``x`` if it is one float image ``(C,H,W)`` on the base classifier's device; UserError otherwise."""
        if not isinstance(x, torch.Tensor):
            raise UserError(f"x must be a torch.Tensor image (C,H,W), got {type(x).__name__}")
        if x.dim() != 3:
            raise UserError(f"x must be one image of shape (C,H,W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise UserError(f"x must be a float image in [0,1], got dtype {x.dtype}")
        param = next(self.base_classifier.parameters(), None)
        if param is not None and param.device != x.device:
            raise UserError(f"x is on {x.device} but the base classifier is on {param.device}; move one of them")
        return x

    def batch_size_for(self, shape: tuple[int, ...], device: torch.device | str) -> int:
        """The samples per forward pass used when ``batch_size`` is None, for images ``shape = (C,H,W)``:
        the CPU's cache-sized batch, or on CUDA the batch that fits half the free memory (measured once per
        shape by :func:`~smoothtransfer.smoothing.sampling.auto_batch_size`)."""
        key = (tuple(int(s) for s in shape), str(device))
        if key not in self._batch_sizes:
            self._batch_sizes[key] = auto_batch_size(self.base_classifier, key[0], device, self._sampling_amp)
        return self._batch_sizes[key]

    def _batch(self, batch_size: int | None, x: torch.Tensor) -> int:
        return self.batch_size_for(tuple(x.shape[-3:]), x.device) if batch_size is None else batch_size

    def counts(self, x: torch.Tensor, num: int, batch_size: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
        """Vote counts ``(num_classes,)`` of ``num`` noisy copies of ``x``, on ``x``'s device (no host sync);
        ``generator`` may be a :class:`~smoothtransfer.smoothing.sampling.NoiseStream` to continue one stream."""
        return sample_counts(self.base_classifier, x, self.sigma, num, self._batch(batch_size, x), self.num_classes,
                             generator=generator, amp_dtype=self._sampling_amp)

    # -- Cohen et al.'s algorithms -------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int | None = None,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the top class of ``n`` noisy votes, or :data:`ABSTAIN` if it is not significant.

        Args:
            x: image ``(C,H,W)`` in [0,1], on the base classifier's device.
            n: number of noise samples.
            alpha: the probability of returning a class other than ``g(x)`` is at most ``alpha``.
            batch_size: samples per forward pass (None: chosen for the device, see :meth:`batch_size_for`);
                the answer does not depend on it under a seeded generator.
            generator: optional seeded ``torch.Generator`` on ``x``'s device type.
        """
        x = self.check_input(x)
        n = positive_int(n, "n")
        alpha = check_alpha(alpha)
        with eval_mode(self.base_classifier):
            counts = self.counts(x, n, batch_size, generator)
        top2_counts, top2_idx = counts.topk(2)
        (n_a, n_b), (c_a, _) = torch.stack([top2_counts, top2_idx]).tolist()  # the one host sync
        if binom_pvalue(n_a, n_a + n_b, 0.5) > alpha:
            return ABSTAIN
        return int(c_a)

    def certify_full(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None,
                     generator: torch.Generator | None = None) -> Certificate:
        """CERTIFY, returning a :class:`Certificate` with ``p_lower``, the vote count and all parameters.

        Args:
            x: image ``(C,H,W)`` in [0,1], on the base classifier's device.
            n0: selection samples used only to choose ``c_A``.
            n: estimation samples, drawn afresh, used only to bound ``p_A``.
            alpha: failure probability of the certificate.
            batch_size: samples per forward pass (None: chosen for the device, see :meth:`batch_size_for`);
                the certificate does not depend on it under a seeded generator.
            generator: optional seeded ``torch.Generator`` on ``x``'s device type; both draws come from it
                one after the other, so they are independent.
        """
        x = self.check_input(x)
        n0 = positive_int(n0, "n0")
        n = positive_int(n, "n")
        alpha = check_alpha(alpha)
        with eval_mode(self.base_classifier):
            counts_selection = self.counts(x, n0, batch_size, generator)
            # The guess stays on the device; the estimation draws are new noise (never reuse the n0 votes).
            c_a = counts_selection.argmax()
            counts_estimation = self.counts(x, n, batch_size, generator)
        c_a, n_a = torch.stack([c_a, counts_estimation[c_a]]).tolist()  # the one host sync
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, n_a, n0, n, alpha, self.sigma)
        return Certificate(int(c_a), float(certified_radius(self.sigma, p_lower)), p_lower, n_a, n0, n, alpha,
                           self.sigma)

    def certify_batch(self, xs: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None,
                      generators: torch.Generator | Sequence[torch.Generator] | None = None) -> list[Certificate]:
        """CERTIFY ``B`` images at once, their noisy copies packed into shared forward batches.

        Packing fills the batch when ``n0`` (or ``n``) is small next to ``batch_size`` — the ``n0 = 100``
        selection draws on a GPU that takes thousands of samples per pass, or N=1000 runs — and costs one
        host sync per call instead of one per image.

        Args:
            xs: images ``(B,C,H,W)`` in [0,1], on the base classifier's device.
            n0, n, alpha, batch_size: as in :meth:`certify_full`.
            generators: a sequence of ``B`` seeded generators, one per image (image ``i`` draws its ``n0``
                selection samples, then its ``n`` estimation samples, from ``generators[i]`` alone, so its
                certificate equals ``certify_full(xs[i], ..., generator=generators[i])``); or one generator
                for a single image-major stream; or None for torch's default generator.

        Returns:
            One :class:`Certificate` per image, in order.
        """
        if not isinstance(xs, torch.Tensor) or xs.dim() != 4 or xs.shape[0] < 1:
            raise UserError(f"xs must be a batch of images (B,C,H,W), got shape {tuple(getattr(xs, 'shape', ()))}")
        for x in xs[:1]:
            self.check_input(x)
        n0 = positive_int(n0, "n0")
        n = positive_int(n, "n")
        alpha = check_alpha(alpha)
        batch_size = self._batch(batch_size, xs[0])
        with eval_mode(self.base_classifier):
            counts_selection = sample_counts_multi(self.base_classifier, xs, self.sigma, n0, batch_size,
                                                   self.num_classes, generators, self._sampling_amp)
            c_a = counts_selection.argmax(dim=1)  # (B,), stays on the device
            # Fresh estimation draws (never the n0 votes): each image's stream continues after its n0 samples.
            counts_estimation = sample_counts_multi(self.base_classifier, xs, self.sigma, n, batch_size,
                                                    self.num_classes, generators, self._sampling_amp)
            n_a = counts_estimation.gather(1, c_a[:, None])[:, 0]
        c_a, n_a = torch.stack([c_a, n_a]).tolist()  # the one host sync
        p_lower = np.atleast_1d(clopper_pearson_lower(np.asarray(n_a, dtype=np.int64), n, alpha))
        radius = np.atleast_1d(certified_radius(self.sigma, p_lower))
        return [
            Certificate(ABSTAIN, 0.0, float(p), int(k), n0, n, alpha, self.sigma) if p < 0.5
            else Certificate(int(c), float(r), float(p), int(k), n0, n, alpha, self.sigma)
            for c, k, p, r in zip(c_a, n_a, p_lower, radius)
        ]

    def predict_batch(self, xs: torch.Tensor, n: int, alpha: float, batch_size: int | None = None,
                      generators: torch.Generator | Sequence[torch.Generator] | None = None) -> list[int]:
        """PREDICT ``B`` images ``(B,C,H,W)`` at once (packed batches); ``generators`` as in :meth:`certify_batch`.

        With one generator per image, ``predict_batch(xs, ...)[i] == predict(xs[i], ..., generators[i])``.
        """
        if not isinstance(xs, torch.Tensor) or xs.dim() != 4 or xs.shape[0] < 1:
            raise UserError(f"xs must be a batch of images (B,C,H,W), got shape {tuple(getattr(xs, 'shape', ()))}")
        for x in xs[:1]:
            self.check_input(x)
        n = positive_int(n, "n")
        alpha = check_alpha(alpha)
        batch_size = self._batch(batch_size, xs[0])
        with eval_mode(self.base_classifier):
            counts = sample_counts_multi(self.base_classifier, xs, self.sigma, n, batch_size, self.num_classes,
                                         generators, self._sampling_amp)
        top2_counts, top2_idx = counts.topk(2, dim=1)
        out = []
        for (n_a, n_b), (c_a, _) in zip(top2_counts.tolist(), top2_idx.tolist()):  # one host sync
            out.append(ABSTAIN if binom_pvalue(n_a, n_a + n_b, 0.5) > alpha else int(c_a))
        return out

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int | None = None,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """CERTIFY: ``(c_A, radius)``, or ``(ABSTAIN, 0.0)``. See :meth:`certify_full`."""
        cert = self.certify_full(x, n0, n, alpha, batch_size, generator)
        return cert.prediction, cert.radius

    def certify_sequential(self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int | None,
                           radii, generator: torch.Generator | None = None, **kwargs):
        """Sample-saving certification on a grid of radii; see :func:`smoothing.sequential.certify_sequential`."""
        return sequential.certify_sequential(self, x, n0, n_max, alpha, batch_size, radii, generator=generator, **kwargs)
