"""Training: the loop that steps a group of SAEs on shared batches, and the memory check before it."""

from saeflow.sae.training.batches import ShuffledBatches, sample_rows
from saeflow.sae.training.from_array import train_on_array
from saeflow.sae.training.memory import (
    MemoryEstimate,
    TrainingMemoryError,
    build_saes,
    build_training_group,
    check_training_memory,
    estimate_training_memory,
    memory_report,
)
from saeflow.sae.training.normalization import Normalization, fit_normalization
from saeflow.sae.training.trainer import (
    NonFiniteLossError,
    SAETrainer,
    TrainingConfig,
    geometric_median,
    lr_lambda,
    train_saes,
)

__all__ = [
    "MemoryEstimate",
    "NonFiniteLossError",
    "Normalization",
    "SAETrainer",
    "ShuffledBatches",
    "TrainingConfig",
    "TrainingMemoryError",
    "build_saes",
    "build_training_group",
    "check_training_memory",
    "estimate_training_memory",
    "fit_normalization",
    "geometric_median",
    "lr_lambda",
    "memory_report",
    "sample_rows",
    "train_on_array",
    "train_saes",
]
