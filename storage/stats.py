"""Per-site normalization statistics computed with Dask over the Zarr chunks (MATH §4.1, §4.2).

Stored as the `stats` attribute of `<site>/acts`, with outlier row indices in `<site>/outlier_rows`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
from pydantic import BaseModel, ConfigDict

from saeflow.sae.training.normalization import normalization_scale, outlier_mask
from saeflow.storage.activations import ActivationStoreRef
from saeflow.storage.integrity import CHUNK_CODECS
from saeflow.storage.zarr_io import WRITE_EVERY_CHUNK, array, open_group


class SiteStats(BaseModel):
    """Normalization statistics of one site (MATH §4.1, §4.2), as stored with its activations (JSON round trip:
    `model_dump(mode="json")` / `model_validate`). Every mean is over the rows kept, i.e. outlier rows left out."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    n_rows: int
    """Rows in the store."""
    n_rows_used: int
    """Rows kept (not outliers): the statistics' sample and the default training budget."""
    d_model: int
    mean: list[float]
    """Per-dimension mean, raw units."""
    var: list[float]
    """Per-dimension variance, raw units."""
    mean_var: float
    mean_norm: float
    """E‖x‖ over kept rows, raw units."""
    median_norm: float
    """Median ‖x‖ over all rows: the outlier threshold's reference."""
    mean_sq_norm: float
    normalize: str
    """The normalization the scale was computed for (`expected_norm`, `unit_mean_square`, `none`)."""
    scale: float
    """c with E‖c·x‖ = √d (`expected_norm`), E‖c·x‖² = 1 (`unit_mean_square`) or 1 (`none`)."""
    outlier_norm_ratio: float | None
    outlier_norm_threshold: float | None
    """Raw row norm above which a row is an outlier; None when outliers are kept."""
    n_outliers: int
    outlier_energy_fraction: float
    """Share of Σ‖x‖² carried by the outlier rows."""
    outlier_positions: list[int]
    """Token positions (1..T-1) where outliers occur, at most 100 distinct."""
    content_hash: str
    """Hash of the site's activation bytes, chunk by chunk: what the statistics describe."""


class NonFiniteActivationsError(ValueError):
    """An activation store holds NaN/inf rows; str() is one line naming the store, the count, the first row, the fix."""


class ComputedStats(NamedTuple):
    """What `compute_site_stats` returns: the statistics and the outlier row indices they left out."""

    stats: SiteStats
    outlier_rows: np.ndarray


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int = 2) -> Iterator[Any]:
    """A client of the scheduler at `address`, or of a fresh LocalCluster (worker processes) torn down after."""
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    with (
        _worker_logs_quiet(),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _worker_logs_quiet() -> Iterator[None]:
    """Worker processes started meanwhile log only CRITICAL records. They write to this process's stderr, and when
    the cluster closes, a heartbeat that races the scheduler's shutdown logs a CommClosedError traceback under a run
    that succeeded; a task's real failure reaches the client as its exception. Dask reads `DASK_*` variables when a
    worker process imports it, so the variable is set while the cluster lives (a restarted worker reads it too)."""
    key = "DASK_LOGGING__DISTRIBUTED"
    before = os.environ.get(key)
    os.environ[key] = "critical"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _chunk_hash(block: np.ndarray) -> np.ndarray:
    return np.array([hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest()], dtype=object)


def compute_site_stats(
    ref: ActivationStoreRef, site: str, outlier_norm_ratio: float | None = 10.0, normalize: str = "expected_norm"
) -> ComputedStats:
    """Mean, variance, mean L2 norm and the normalization scale of one site, outlier rows excluded.

    Runs on whatever Dask client is current (see `dask_client`). The scale c makes E‖c·x‖ = √d for
    `expected_norm` and E‖c·x‖² = 1 for `unit_mean_square`; it is 1 for `none`.
    """
    arr = ref.array(site)
    x = da.from_zarr(arr).astype(np.float64)
    d = x.shape[1]
    norms_d = da.sqrt((x**2).sum(axis=1))
    hashes_d = da.map_blocks(_chunk_hash, x.rechunk({1: -1}).astype(arr.dtype), drop_axis=1, dtype=object)
    nonfinite_d = ~da.isfinite(x).all(axis=1)
    norms, hashes, nonfinite = dask.compute(norms_d, hashes_d, nonfinite_d)
    if nonfinite.any():
        bad = np.flatnonzero(nonfinite)
        raise NonFiniteActivationsError(
            f"activation store {ref.url}, site {site}: {len(bad)} of {len(norms)} rows hold NaN/inf (first: row "
            f"{bad[0]}, token position {bad[0] % ref.rows_per_window + 1} of window {bad[0] // ref.rows_per_window}); "
            "no statistics or SAEs are made from it. Delete that store and extract again (an fp16 model may overflow: "
            "set model.dtype to float32 or bfloat16)"
        )
    median = float(np.median(norms))
    outliers = np.flatnonzero(outlier_mask(norms, outlier_norm_ratio)).astype(np.int64)
    keep = np.ones(len(norms), dtype=bool)
    keep[outliers] = False
    keep_d = da.from_array(keep, chunks=(x.chunks[0],))
    xk = x * keep_d[:, None]
    n = int(keep.sum())
    s1, s2, sn = dask.compute(xk.sum(axis=0), (xk**2).sum(axis=0), (norms_d * keep_d).sum())
    mean = s1 / n
    var = s2 / n - mean**2
    mean_norm = float(sn) / n
    mean_sq_norm = float(s2.sum()) / n
    scale = normalization_scale(normalize, int(d), mean_norm, mean_sq_norm)  # type: ignore[arg-type]
    energy = norms**2
    positions = (outliers % ref.rows_per_window + 1).tolist()  # +1: row 0 of a window is token position 1
    stats = SiteStats(
        n_rows=len(norms),
        n_rows_used=n,
        d_model=int(d),
        mean=mean.tolist(),
        var=var.tolist(),
        mean_var=float(var.mean()),
        mean_norm=mean_norm,
        median_norm=median,
        mean_sq_norm=mean_sq_norm,
        normalize=normalize,
        scale=scale,
        outlier_norm_ratio=outlier_norm_ratio,
        outlier_norm_threshold=None if outlier_norm_ratio is None else outlier_norm_ratio * median,
        n_outliers=len(outliers),
        outlier_energy_fraction=float(energy[outliers].sum() / energy.sum()) if len(outliers) else 0.0,
        outlier_positions=sorted(set(positions))[:100],
        content_hash=hashlib.sha256("".join(hashes.tolist()).encode()).hexdigest(),
    )
    return ComputedStats(stats, outliers)


def save_site_stats(ref: ActivationStoreRef, site: str, stats: SiteStats, outlier_rows: np.ndarray) -> None:
    """Store the statistics as `<site>/acts`' `stats` attribute and the outlier rows as `<site>/outlier_rows`
    (rows first: statistics present means their outlier rows are too)."""
    g = open_group(ref.url, mode="a")
    rows = np.asarray(outlier_rows, dtype=np.int64)
    a = g.require_group(site).create_array(
        "outlier_rows",
        shape=rows.shape,
        dtype="int64",
        overwrite=True,
        compressors=CHUNK_CODECS,
        config=WRITE_EVERY_CHUNK,
    )
    if len(rows):
        a[:] = rows
    array(g, f"{site}/acts").attrs["stats"] = stats.model_dump(mode="json")


def load_site_stats(ref: ActivationStoreRef, site: str) -> SiteStats | None:
    saved = dict(ref.array(site).attrs).get("stats")
    return None if saved is None else SiteStats.model_validate(saved)
