"""Ground-truth recovery on a small synthetic superposition instance (the benchmark's generator, sae/synthetic.py).

All architectures train together on one shared stream (one data pass), as a sweep would.
"""

from __future__ import annotations

import pytest
import torch

from sae.synthetic import SyntheticActivations, SyntheticConfig, train_synthetic

D, FEATURES, D_SAE, STEPS, BATCH = 64, 128, 256, 1500, 512
SPECS = [
    {"architecture": "relu", "l1_coefficient": 1.0, "lr": 3e-3},
    {"architecture": "gated", "l1_coefficient": 1.0, "lr": 3e-3},
    {"architecture": "jumprelu", "l0_coefficient": 0.3, "lr": 3e-3},
    {"architecture": "topk", "k": 6, "lr": 3e-3},
    {"architecture": "batchtopk", "k": 6, "lr": 3e-3},
    {"architecture": "topafa", "lr": 3e-3},
]


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and immune to a busy machine
    try:
        truth = SyntheticActivations(SyntheticConfig(d=D, n_features=FEATURES, seed=0))
        specs = [{**s, "d_sae": D_SAE} for s in SPECS]
        rows, _ = train_synthetic(truth, specs, STEPS, BATCH, seed=0)
    finally:
        torch.set_num_threads(threads)
    return {spec["architecture"]: m for spec, m in rows}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated"])
def test_recovers_90_percent_of_true_features(results, arch):
    m = results[arch]
    assert m["recovered"] >= 0.9, m
    assert m["fvu"] < 0.35 and m["l0"] < 3 * m["true_l0"], m


@pytest.mark.xfail(strict=True, reason=(
    "top-AFA as specified (SPEC 2.6) lands at high L0 on superposition data: on this instance it reaches "
    "FVU ≈ 0.01 with L0 ≈ 3-10× the true L0 and recovers few features at cos > 0.9 (see benchmarks/README.md)"))
def test_topafa_recovers_90_percent_of_true_features(results):
    assert results["topafa"]["recovered"] >= 0.9, results["topafa"]


@pytest.mark.parametrize("arch", ["gated", "jumprelu", "topk"])
def test_shrinks_less_than_relu_at_similar_l0(results, arch):
    relu, m = results["relu"], results[arch]
    assert 0.4 < m["l0"] / relu["l0"] < 2.5, (m["l0"], relu["l0"])  # comparable sparsity
    assert relu["shrinkage_gamma"] < 0.95  # ReLU+L1 really shrinks here
    assert abs(1 - m["shrinkage_gamma"]) < abs(1 - relu["shrinkage_gamma"]), (m, relu)
