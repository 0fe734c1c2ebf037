"""Training from an array in a notebook, step for step as the pipeline's train task does it from its store.

The pipeline's stages are: normalization statistics (scale, outlier rows), SAEs built from the training seed with
that scale, a b_dec sample, the shuffled batch stream, `train_saes`. `train_on_array` runs the same library
functions on a numpy array, a tensor or any row array, so for the same rows, chunking, specs and `TrainingConfig`
it returns the SAEs the pipeline registers (tests/test_library_path.py checks it against the train task).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from saeflow.sae.architectures.base import SAE, SAEConfig
from saeflow.sae.training.batches import DEFAULT_CHUNK_ROWS, RowArray, ShuffledBatches, buffer_bytes, sample_rows
from saeflow.sae.training.memory import build_training_group, estimate_training_memory
from saeflow.sae.training.normalization import Normalization, NormalizeMethod, fit_normalization
from saeflow.sae.training.trainer import SAETrainer, StepCallback, TrainingConfig, train_saes


def row_blocks(rows: RowArray, block_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[torch.Tensor]:
    """Contiguous blocks of `rows` as float tensors: a bounded-memory pass over an array too large to copy."""
    for lo in range(0, int(rows.shape[0]), block_rows):
        block = rows[lo : lo + block_rows]
        yield block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))


def train_on_array(
    rows: RowArray,
    specs: Sequence[SAEConfig],
    cfg: TrainingConfig | None = None,
    *,
    tokens: int | None = None,
    normalize: NormalizeMethod = "expected_norm",
    outlier_norm_ratio: float | None = 10.0,
    b_dec_sample_rows: int = 4096,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> tuple[list[SAE], SAETrainer, Normalization]:
    """Train `specs` on raw activation `rows` [n, d] as the pipeline would: returns (SAEs, trainer, normalization).

    The defaults are the pipeline's (`stats.normalize`, `stats.outlier_norm_ratio`, `train.tokens` = one pass over
    the kept rows, `train.b_dec_sample_rows`); `chunk_rows` is the block the stream shuffles by, the store's
    `extract.chunk_rows` in the pipeline. The SAEs carry the scale as `input_scale`, so `encode_raw(x)` takes the
    model's own activations.
    """
    cfg = cfg or TrainingConfig()
    d = int(rows.shape[1])
    norm = fit_normalization(row_blocks(rows, chunk_rows), normalize, outlier_norm_ratio)
    total = tokens or norm.n_rows - norm.n_outliers
    buffer = buffer_bytes(d, cfg.batch_size, chunk_rows)
    group = f"{len(specs)} SAEs on {norm.n_rows:,} rows"
    est = estimate_training_memory(list(specs), d, cfg.batch_size, buffer)
    saes = build_training_group(specs, d, cfg, norm.scale, group, est)
    sample = sample_rows(rows, b_dec_sample_rows, norm.scale, cfg.seed, chunk_rows, norm.outlier_rows)
    batches = ShuffledBatches(rows, cfg.batch_size, norm.scale, cfg.seed, chunk_rows, excluded=norm.outlier_rows)
    trainer = train_saes(list(saes), batches, cfg, total, sample, on_step, progress, group=group, buffer_bytes=buffer)
    return saes, trainer, norm
