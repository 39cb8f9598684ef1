"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019).

``Smooth(base_classifier, num_classes, sigma).certify(x, n0, n, alpha)`` returns ``(class, radius)`` or
``(ABSTAIN, 0.0)``, with the CLI's speed-ups applied to the base classifier (:func:`prepare`, ``fast=True``);
:func:`certify_sequential` saves samples on a grid of radii with an anytime-valid bound; ``stats`` holds the
pure Clopper-Pearson / binomial-test / radius functions.

A whole dataset from a checkpoint: :func:`certify_run` (:class:`CertifyConfig`) and :func:`predict_run`
(:class:`PredictConfig`), the jobs behind ``smoothtransfer certify`` / ``predict`` (in :mod:`.jobs`). Their
result files (format, version, resume, summaries, the reader ``load_run``) belong to :mod:`.results`.
"""

from smoothtransfer.job_configs import CertifyConfig, PredictConfig
from smoothtransfer.smoothing.fast import FastClassifier, cpu_has_amx_bf16, prepare, resolve_amp
from smoothtransfer.smoothing.sampling import (
    auto_batch_size,
    compile_for_inference,
    default_batch_size,
    prepare_for_inference,
    sample_counts,
    sample_counts_multi,
)
from smoothtransfer.smoothing.sequential import SequentialCertificate, certify_sequential, stage_sizes
from smoothtransfer.smoothing.smooth import ABSTAIN, Certificate, Smooth
from smoothtransfer.smoothing.stats import (
    binom_pvalue,
    certified_radius,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_certifiable_radius,
)

__all__ = [
    "ABSTAIN",
    "Certificate",
    "CertifyConfig",
    "CertifyResult",
    "PredictConfig",
    "FastClassifier",
    "SequentialCertificate",
    "Smooth",
    "auto_batch_size",
    "binom_pvalue",
    "certified_radius",
    "certify_run",
    "certify_sequential",
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "compile_for_inference",
    "cpu_has_amx_bf16",
    "default_batch_size",
    "max_certifiable_radius",
    "predict_run",
    "prepare",
    "prepare_for_inference",
    "resolve_amp",
    "sample_counts",
    "sample_counts_multi",
    "stage_sizes",
]
_JOBS = ("CertifyResult", "certify_run", "predict_run")


def __getattr__(name: str):
    # The jobs load checkpoints (models), datasets (data) and print tables (reporting), layers that sit above
    # this package; loaded on first use, so ``import smoothtransfer.smoothing`` stays the core and the package
    # graph has no circle.
    if name in _JOBS:
        from smoothtransfer.smoothing import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
