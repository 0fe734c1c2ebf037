"""Dask statistics over Zarr chunks equal numpy's on the same array, outliers included in the check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saeflow.storage.activations import ActivationWriter, iter_training_batches
from saeflow.storage.stats import compute_site_stats, dask_client, save_site_stats


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows_per_window, n_windows, d = 15, 200, 24
    x = (rng.normal(size=(n_windows * rows_per_window, d)) * rng.uniform(0.5, 2, size=d) + 3.0).astype(np.float32)
    outliers = np.array([0, 15, 450, 2999])
    x[outliers] *= 100.0  # rows with enormous norms, as LM residual streams have (MATH §4.2)
    url = str(tmp_path_factory.mktemp("stats") / "acts")
    w = ActivationWriter(url, ["s"], n_windows, rows_per_window, d, "float32", {"test": 1}, {}, target_chunk_rows=300)
    w.add({"s": x})
    return w.finish(), x, outliers


def test_dask_stats_equal_numpy(store):
    ref, x, outliers = store
    with dask_client(n_workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        st, outlier_rows = compute_site_stats(ref, "s", outlier_norm_ratio=10.0, normalize="expected_norm")
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1)
    keep = norms <= 10.0 * np.median(norms)
    np.testing.assert_array_equal(outlier_rows, np.flatnonzero(~keep))
    np.testing.assert_array_equal(np.flatnonzero(~keep), outliers)
    np.testing.assert_allclose(st.mean, x64[keep].mean(0), rtol=1e-10)
    np.testing.assert_allclose(st.var, x64[keep].var(0), rtol=1e-8)
    assert st.mean_norm == pytest.approx(norms[keep].mean(), rel=1e-12)
    assert st.median_norm == pytest.approx(np.median(norms), rel=1e-12)
    assert st.scale == pytest.approx(math.sqrt(x.shape[1]) / norms[keep].mean(), rel=1e-12)
    assert st.n_rows_used == keep.sum() and st.n_outliers == 4
    energy = norms**2
    assert st.outlier_energy_fraction == pytest.approx(energy[~keep].sum() / energy.sum(), rel=1e-12)
    assert st.outlier_positions == sorted({int(r % 15) + 1 for r in outliers})


def test_unit_mean_square_scale_and_training_batches_skip_outliers(store):
    ref, x, outliers = store
    with dask_client(n_workers=1):
        st, outlier_rows = compute_site_stats(ref, "s", outlier_norm_ratio=10.0, normalize="unit_mean_square")
    keep = np.ones(len(x), bool)
    keep[outliers] = False
    assert st.scale == pytest.approx(1 / math.sqrt((x[keep].astype(np.float64) ** 2).sum(1).mean()), rel=1e-10)
    save_site_stats(ref, "s", st, outlier_rows)
    batches = iter_training_batches(ref, "s", batch_size=100, scale=1.0, seed=3)
    seen = np.concatenate([next(batches).numpy() for _ in range(keep.sum() // 100)])
    # The first epoch's batches are distinct kept rows: no outlier, no repeat.
    as_rows = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert len(seen) == (keep.sum() // 100) * 100
    assert len(as_rows(seen)) == len(seen)
    assert as_rows(seen) <= as_rows(x[keep])


def test_stats_on_an_existing_scheduler_match_the_local_cluster(store):
    from distributed import LocalCluster

    ref, _x, _ = store
    with dask_client(n_workers=1):
        local = compute_site_stats(ref, "s").stats
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        dask_client(address=cluster.scheduler_address) as client,
    ):
        assert client.scheduler.address == cluster.scheduler_address
        remote = compute_site_stats(ref, "s").stats
    assert remote.content_hash == local.content_hash
    assert remote.scale == local.scale and remote.mean == local.mean


def test_non_finite_activations_are_found_at_stats_time_naming_the_store_count_and_first_row(tmp_path):
    from saeflow.storage.stats import NonFiniteActivationsError

    x = np.random.default_rng(1).normal(size=(10 * 15, 8)).astype(np.float32)
    x[37, 2], x[120, 0] = np.nan, np.inf
    url = str(tmp_path / "acts")
    w = ActivationWriter(url, ["s"], 10, 15, 8, "float32", {"test": 2}, {}, target_chunk_rows=30)
    w.add({"s": x})
    ref = w.finish()
    with pytest.raises(NonFiniteActivationsError) as err:
        compute_site_stats(ref, "s")
    assert str(err.value) == (
        f"activation store {url}, site s: 2 of 150 rows hold NaN/inf (first: row 37, token position 8 of window 2); "
        "no statistics or SAEs are made from it. Delete that store and extract again (an fp16 model may overflow: "
        "set model.dtype to float32 or bfloat16)"
    )
