"""The notebook path gives what the pipeline gives (issue 11, point 4): the pipeline's normalization as a library
function, b_dec_init honoured without a sample, `decode_raw`, and one seed fixing the initial weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow.sae import ReLUConfig, TopKConfig
from saeflow.sae.training import (
    TrainingConfig,
    build_saes,
    build_training_group,
    estimate_training_memory,
    fit_normalization,
    geometric_median,
    train_saes,
)
from saeflow.storage.stats import compute_site_stats, dask_client
from tests.test_stats import store  # noqa: F401  # the fixture: a store with 4 planted outlier rows


@pytest.mark.parametrize("method", ["expected_norm", "unit_mean_square", "none"])
def test_fit_normalization_equals_the_pipeline_stats_on_the_same_rows(store, method):  # noqa: F811
    ref, x, outliers = store
    with dask_client(n_workers=1):
        st, outlier_rows = compute_site_stats(ref, "s", outlier_norm_ratio=10.0, normalize=method)
    blocks = (torch.from_numpy(x[i : i + 700]) for i in range(0, len(x), 700))  # an iterator of blocks works too
    norm = fit_normalization(blocks, method, outlier_norm_ratio=10.0)
    assert norm.scale == pytest.approx(st.scale, rel=1e-12)
    assert norm.outlier_norm_threshold == pytest.approx(st.outlier_norm_threshold, rel=1e-12)
    assert (norm.n_rows, norm.n_outliers) == (st.n_rows, st.n_outliers) == (len(x), len(outliers))
    applied = norm.apply(torch.from_numpy(x))
    kept = np.delete(x, outlier_rows, axis=0)
    torch.testing.assert_close(applied, torch.from_numpy(kept) * np.float32(norm.scale), rtol=0, atol=0)


def test_decode_raw_inverts_encode_raw_in_the_models_units():
    (sae,) = build_saes([TopKConfig(k=4, expansion_factor=2)], d_in=16, seed=3, input_scale=0.25)
    x = torch.randn(2, 5, 16) * 4
    codes = sae.encode_raw(x)
    assert codes.shape == (2, 5, 32)
    torch.testing.assert_close(sae.decode_raw(codes), sae.reconstruct_raw(x), rtol=0, atol=0)


def test_one_seed_fixes_the_initial_weights_as_in_the_pipeline():
    specs = [TopKConfig(k=4, expansion_factor=2), ReLUConfig(expansion_factor=2)]
    cfg = TrainingConfig(seed=7, batch_size=64)
    a, b = build_saes(specs, 16, seed=7, input_scale=2.0), build_saes(specs, 16, seed=7, input_scale=2.0)
    est = estimate_training_memory(specs, 16, 64, 0)
    piped = build_training_group(specs, 16, cfg, 2.0, "group", est)
    for x, y, z in zip(a, b, piped):
        for (name, p), q, r in zip(x.state_dict().items(), y.state_dict().values(), z.state_dict().values()):
            assert torch.equal(p, q) and torch.equal(p, r), name
    other = build_saes(specs, 16, seed=8)
    assert not torch.equal(other[0].W_dec, a[0].W_dec)


def test_b_dec_init_is_honoured_without_a_sample_from_the_first_batch_which_is_still_trained_on():
    torch.manual_seed(0)
    first = torch.randn(64, 16) + 5.0
    cfg = TrainingConfig(batch_size=64, log_every=1)
    (median_sae,) = build_saes([TopKConfig(k=4, expansion_factor=2)], 16)
    train_saes([median_sae], iter([first]), cfg, total_tokens=0, progress=False)
    torch.testing.assert_close(median_sae.b_dec, geometric_median(first))
    (mean_sae,) = build_saes([TopKConfig(k=4, expansion_factor=2, b_dec_init="mean")], 16)
    trainer = train_saes([mean_sae], iter([first]), cfg, total_tokens=64, progress=False)
    assert trainer.tokens_seen == 64  # the batch used for b_dec was trained on, not dropped
    (zero_sae,) = build_saes([TopKConfig(k=4, expansion_factor=2, b_dec_init="zeros")], 16)
    train_saes([zero_sae], iter([first]), cfg, total_tokens=0, progress=False)
    assert torch.count_nonzero(zero_sae.b_dec) == 0


def test_training_from_an_array_in_a_notebook_equals_the_pipelines_train_task(store, tmp_path):  # noqa: F811
    """The same rows as a numpy array → `train_on_array` gives the weights the train task registers from the store
    (after the Dask stats stage): same scale, outlier rows, b_dec sample, batch order and seed."""
    from saeflow.config import validate_config
    from saeflow.sae.training import train_on_array
    from saeflow.storage.sae_sources import load_sae_ref
    from saeflow.storage.stats import save_site_stats
    from saeflow.tasks.common import tracker
    from saeflow.tasks.train import train_site_saes

    ref, x, outliers = store
    specs = [TopKConfig(k=4, d_sae=48), ReLUConfig(l1_coefficient=1.0, d_sae=48, b_dec_init="mean")]
    train = {"batch_size": 64, "log_every": 5, "device": "cpu", "seed": 11, "b_dec_sample_rows": 512}
    cfg = validate_config({"root": str(tmp_path / "work"), "saes": [s.model_dump() for s in specs], "train": train})
    with dask_client(n_workers=1):
        st, outlier_rows = compute_site_stats(ref, "s", outlier_norm_ratio=10.0, normalize="expected_norm")
    save_site_stats(ref, "s", st, outlier_rows)
    tr = tracker(cfg)
    registered = train_site_saes.fn(cfg, ref, st, "s", list(cfg.saes), tr.start_run("pipeline"))

    notebook, trainer, norm = train_on_array(
        x,
        specs,
        TrainingConfig(**{k: v for k, v in train.items() if k != "b_dec_sample_rows"}),
        b_dec_sample_rows=512,
        chunk_rows=ref.chunk_rows,
        progress=False,
    )
    np.testing.assert_array_equal(norm.outlier_rows, outliers)
    assert st.n_rows_used == len(x) - len(outliers)
    assert trainer.tokens_seen == -(-st.n_rows_used // 64) * 64  # one pass over the kept rows, in whole batches
    for mine, entry in zip(notebook, registered):
        piped = load_sae_ref(f"{entry.registered_name}/{entry.version}", cfg.tracking_uri)
        assert type(piped) is type(mine) and float(piped.input_scale) == pytest.approx(float(mine.input_scale))
        for name, w in piped.state_dict().items():
            torch.testing.assert_close(mine.state_dict()[name], w, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(mine.b_dec, torch.zeros_like(mine.b_dec))  # b_dec_init was applied
