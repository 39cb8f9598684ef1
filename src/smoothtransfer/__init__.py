"""smoothtransfer: certifiably robust image classifiers by transfer learning, certified with randomized smoothing."""

__version__ = "0.1.0"
