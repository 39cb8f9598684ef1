"""Evaluation of smoothed classifiers: certified accuracy, ACR (``metrics``), attacks, noise profiles."""

from smoothtransfer.evaluation.metrics import (
    abstain_rate,
    accuracy,
    acr,
    certified_accuracy,
    radius_grid,
    radius_key,
    summarize_certificates,
)

__all__ = ["abstain_rate", "accuracy", "acr", "certified_accuracy", "radius_grid", "radius_key",
           "summarize_certificates"]
