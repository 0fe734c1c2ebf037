"""Ground-truth recovery on a small synthetic superposition instance (the benchmark's generator,
sae/evaluation/synthetic.py).

All architectures train together on one shared stream (one data pass), as a sweep would.
"""

from __future__ import annotations

import pytest
import torch

from saeflow.sae.evaluation.synthetic import REFERENCE_SPECS, SyntheticActivations, SyntheticConfig, train_synthetic

D, FEATURES, D_SAE, STEPS, BATCH = 64, 128, 256, 1500, 512
SPECS = {
    name: REFERENCE_SPECS[name] for name in ("relu", "gated", "jumprelu", "topk", "batchtopk", "topafa", "topafa_no_l1")
}


@pytest.fixture(scope="module")
def results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and immune to a busy machine
    try:
        truth = SyntheticActivations(SyntheticConfig(d=D, n_features=FEATURES, seed=0))
        specs = [{**s, "d_sae": D_SAE} for s in SPECS.values()]
        rows, _ = train_synthetic(truth, specs, STEPS, BATCH, seed=0)
    finally:
        torch.set_num_threads(threads)
    return {name: m for name, (_, m) in zip(SPECS, rows)}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated", "topafa"])
def test_recovers_90_percent_of_true_features(results, arch):
    m = results[arch]
    assert m["recovered"] >= 0.9, m
    # top-AFA picks its own L0: about 3× the true L0 here (without L1 it is over 10×).
    assert m["fvu"] < 0.35 and m["l0"] < (4 if arch == "topafa" else 3) * m["true_l0"], m


@pytest.mark.xfail(
    strict=True,
    reason=(
        "top-AFA exactly as MATH §2.6 has it (no L1) has no pressure toward few latents: on this instance it settles "
        "on a dense code (L0 ≈ 10× the true L0, FVU ≈ 0.01) whose decoder rows are mixtures (benchmarks/README.md)"
    ),
)
def test_topafa_without_l1_recovers_90_percent_of_true_features(results):
    assert results["topafa_no_l1"]["recovered"] >= 0.9, results["topafa_no_l1"]


@pytest.mark.parametrize("arch", ["gated", "jumprelu", "topk"])
def test_shrinks_less_than_relu_at_similar_l0(results, arch):
    relu, m = results["relu"], results[arch]
    assert 0.4 < m["l0"] / relu["l0"] < 2.5, (m["l0"], relu["l0"])  # comparable sparsity
    assert relu["shrinkage_gamma"] < 0.95  # ReLU+L1 really shrinks here
    assert abs(1 - m["shrinkage_gamma"]) < abs(1 - relu["shrinkage_gamma"]), (m, relu)
