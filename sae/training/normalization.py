"""Input normalization as the pipeline does it (MATH §4.1, §4.2), for a researcher's own activations.

The pipeline's stats stage computes the same quantities with Dask over a Zarr store (`storage/stats.py`); both use
`outlier_mask` and `normalization_scale` from here, so an SAE trained in a notebook on `Normalization.apply(x)` sees
what the pipeline's SAE sees and its documented coefficients mean the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

NormalizeMethod = Literal["expected_norm", "unit_mean_square", "none"]


def outlier_mask(norms: np.ndarray, outlier_norm_ratio: float | None) -> np.ndarray:
    """True for rows whose norm exceeds `outlier_norm_ratio` × the median norm (never for None)."""
    if outlier_norm_ratio is None:
        return np.zeros(len(norms), dtype=bool)
    return norms > outlier_norm_ratio * float(np.median(norms))


def normalization_scale(method: NormalizeMethod, d: int, mean_norm: float, mean_sq_norm: float) -> float:
    """c with E‖c·x‖ = √d (`expected_norm`), E‖c·x‖² = 1 (`unit_mean_square`), or 1 (`none`), over kept rows."""
    return {
        "expected_norm": math.sqrt(d) / mean_norm,
        "unit_mean_square": 1.0 / math.sqrt(mean_sq_norm),
        "none": 1.0,
    }[method]


@dataclass(frozen=True)
class Normalization:
    """What `fit_normalization` found: the scale and the outlier threshold (raw units)."""

    scale: float
    outlier_norm_threshold: float | None
    n_rows: int
    n_outliers: int
    outlier_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), compare=False, repr=False)
    """Positions of the outlier rows among those fitted (what `ShuffledBatches(excluded=...)` leaves out)."""

    def apply(self, x: Tensor) -> Tensor:
        """Rows of raw activations [n, d] → training units: outlier rows dropped, the rest × scale."""
        if self.outlier_norm_threshold is not None:
            x = x[x.double().norm(dim=-1) <= self.outlier_norm_threshold]
        return x.float() * self.scale


def fit_normalization(
    x: Tensor | Iterable[Tensor],
    method: NormalizeMethod = "expected_norm",
    outlier_norm_ratio: float | None = 10.0,
) -> Normalization:
    """The pipeline's normalization of raw activation rows (a [n, d] tensor or an iterable of row blocks): rows
    with a norm over `outlier_norm_ratio` × the median are outliers, and the scale is fitted on the other rows.
    Set the SAE's `input_scale` to `.scale` so `encode_raw` / `decode_raw` work in the model's units."""
    blocks = [x] if isinstance(x, Tensor) else list(x)
    norms = torch.cat([b.double().norm(dim=-1) for b in blocks]).numpy()
    d = blocks[0].shape[-1]
    outliers = outlier_mask(norms, outlier_norm_ratio)
    kept = norms[~outliers]
    scale = normalization_scale(method, d, float(kept.mean()), float((kept**2).mean()))
    threshold = None if outlier_norm_ratio is None else outlier_norm_ratio * float(np.median(norms))
    return Normalization(scale, threshold, len(norms), int(outliers.sum()), np.flatnonzero(outliers))
