"""symfast.train: sparse training of real models, with a magnitude-pruning baseline in the same run.

* :func:`fit` trains one's own ``nn.Module`` on one's own map-style dataset (exactly resumable,
  DistributedDataParallel under ``torchrun``); convert the model first with :func:`symfast.convert`
  to train it under a DCS structure.
* :func:`run` / ``symfast train`` runs a whole experiment on a shipped task (``lm``: a byte
  transformer on the standard library's sources; ``digits``: a CNN on scikit-learn's digits).
* :func:`symfast.train.sweep.sweep` / ``symfast train --sweep`` runs it at several target sparsities and seeds and
  writes the sparsity / loss Pareto front of DCS and the baselines (``pareto.json``, ``pareto.png``).
"""

from .data import ByteWindows, digits_data, lm_data, stdlib_files
from .loop import FitResult, Interrupted, cross_entropy, dcs_sparsity, evaluate, fit, lr_at
from ..models import ByteTransformer, DigitsCNN, ResNet18
from .task import TrainConfig, defaults, inference_speedup, prune_like, run

__all__ = [
    "fit", "evaluate", "FitResult", "Interrupted", "cross_entropy", "dcs_sparsity", "lr_at",
    "ByteWindows", "lm_data", "digits_data", "stdlib_files",
    "ByteTransformer", "DigitsCNN", "ResNet18",
    "TrainConfig", "run", "defaults", "prune_like", "inference_speedup",
]
