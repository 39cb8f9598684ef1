"""Training: one engine (:mod:`smoothtransfer.train.engine`: the epoch/step loop and the one resume format,
``OUT/checkpoint.pt``) serving classifiers (:func:`smoothtransfer.train.loop.run_training` with a
:class:`~smoothtransfer.config.TrainConfig`) and denoisers (:func:`train_denoiser` with a
:class:`DenoiserConfig`)."""

from smoothtransfer.train.denoiser import DenoiserConfig, train_denoiser

__all__ = ["DenoiserConfig", "train_denoiser"]
