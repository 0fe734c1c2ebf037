"""Synthetic activations with known ground truth, and how well an SAE recovers it.

Activations are sparse non-negative combinations of known unit directions in superposition (more features than
dimensions), with power-law firing frequencies, co-firing groups, a mean offset and small noise.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from saeflow.sae.architectures.base import SAE
from saeflow.sae.evaluation.metrics import ReconstructionMetrics


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    d: int = Field(64, ge=2)
    """Activation width."""
    n_features: int = Field(256, ge=1)
    """True features (directions); > d puts them in superposition."""
    mean_active: float = Field(6.0, gt=0)
    """Expected number of firing features per row."""
    power_law: float = Field(0.5, ge=0)
    """Firing probability of feature i ∝ (i + 1)^−power_law."""
    group_size: int = Field(3, ge=1)
    """Features per co-firing group: when a group's first feature fires, the others fire with `group_prob`."""
    n_groups: int = Field(8, ge=0)
    group_prob: float = Field(0.7, ge=0, le=1)
    magnitude: tuple[float, float] = (0.5, 2.0)
    """Uniform range of a firing feature's coefficient."""
    offset_norm: float = Field(1.0, ge=0)
    """Norm of the mean offset added to every row."""
    noise: float = Field(0.01, ge=0)
    """Std of isotropic Gaussian noise per coordinate."""
    seed: int = 0


TRUTH_STREAM = 0x5A_E7_12_E5
"""Offset of the ground truth's generator seed from the instance's `seed` (see SyntheticActivations)."""


class SyntheticActivations:
    """A fixed ground truth (directions, probabilities, groups, offset) from which rows are sampled."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        # A stream of its own: seeded with cfg.seed alone, the directions were the very numbers torch.manual_seed(seed)
        # gives the first SAE built after it (randn(n, d) either way), so that SAE started AT the ground truth.
        g = torch.Generator().manual_seed(TRUTH_STREAM + cfg.seed)
        dirs = torch.randn(cfg.n_features, cfg.d, generator=g)
        self.directions = dirs / dirs.norm(dim=1, keepdim=True)
        p = (torch.arange(cfg.n_features) + 1.0) ** -cfg.power_law
        self.probs = (p * cfg.mean_active / p.sum()).clamp(max=0.5)
        self.probs = self.probs[torch.randperm(cfg.n_features, generator=g)]  # rare features are not all at the end
        perm = torch.randperm(cfg.n_features, generator=g)
        self.groups = perm[: cfg.n_groups * cfg.group_size].view(cfg.n_groups, cfg.group_size)
        off = torch.randn(cfg.d, generator=g)
        self.offset = off / off.norm() * cfg.offset_norm
        self._gen = g

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        g = generator or self._gen
        fire = torch.rand(n, self.cfg.n_features, generator=g) < self.probs
        if len(self.groups):
            leader = fire[:, self.groups[:, 0]]  # [n, n_groups]
            follow = torch.rand(n, *self.groups[:, 1:].shape, generator=g) < self.cfg.group_prob
            fire[:, self.groups[:, 1:]] |= leader[:, :, None] & follow
        lo, hi = self.cfg.magnitude
        mags = lo + (hi - lo) * torch.rand(n, self.cfg.n_features, generator=g)
        return fire * mags

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        g = generator or self._gen
        codes = self.sample_codes(n, g)
        return codes @ self.directions + self.offset + self.cfg.noise * torch.randn(n, self.cfg.d, generator=g)

    def batches(self, batch_size: int, n_batches: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            yield self.sample(batch_size, g)


# Name → spec: sparsity settings that land near the true L0 (~6) of the default instance (d 64, 128 features), lr
# tuned for a few thousand steps. Shared by benchmarks/synthetic.py and tests/test_ground_truth.py. top-AFA appears
# twice: with the reference code's L1 term, and exactly as MATH §2.6 has it (no L1).
REFERENCE_SPECS: dict[str, dict] = {
    "relu": {"architecture": "relu", "l1_coefficient": 1.0, "lr": 3e-3},
    "gated": {"architecture": "gated", "l1_coefficient": 1.0, "lr": 3e-3},
    "jumprelu": {"architecture": "jumprelu", "l0_coefficient": 0.3, "lr": 3e-3},
    "topk": {"architecture": "topk", "k": 6, "lr": 3e-3},
    "batchtopk": {"architecture": "batchtopk", "k": 6, "lr": 3e-3},
    "topafa": {"architecture": "topafa", "l1_coefficient": 0.3, "lr": 3e-3},
    "topafa_no_l1": {"architecture": "topafa", "lr": 3e-3},
    "matryoshka": {"architecture": "matryoshka", "k": 6, "lr": 3e-3},
}


HARD_REGIME = SyntheticConfig(
    d=64,
    n_features=512,
    mean_active=5.0,
    power_law=1.0,
    n_groups=32,
    group_size=3,
    group_prob=0.8,
    offset_norm=3.0,
    noise=0.02,
)
"""The hard ground truth of benchmarks/synthetic.py `--regime hard`: 8× overcomplete (512 features in d 64), a
heavy tail of firing frequencies (p ∝ 1/(i+1): the rarest fires on 0.14% of rows), 32 co-firing triples, a mean
offset of norm 3 (the signal's typical norm is about 2.8) and noise; L0 ≈ 5. Every seed gives a new instance."""


HARD_REGIME_FAST = HARD_REGIME.model_copy(update={"n_features": 256, "n_groups": 16})
"""The hard regime at half the features (4× overcomplete in d 64, 16 co-firing triples; L0 ≈ 5.6): small enough for
the test suite's fast version (tests/test_hard_ground_truth.py), which trains 1500 steps × 256 rows."""


def matched_specs(true_l0: float, d_sae: int) -> dict[str, dict]:
    """One spec per architecture at the true L0 with shipped defaults otherwise: k = round(true L0) for the TopK
    family, `target_l0` = true L0 for every architecture with a coefficient (MATH §3.5)."""
    k = max(1, round(true_l0))
    return {
        "relu": {"architecture": "relu", "target_l0": true_l0, "d_sae": d_sae},
        "gated": {"architecture": "gated", "target_l0": true_l0, "d_sae": d_sae},
        "jumprelu": {"architecture": "jumprelu", "target_l0": true_l0, "d_sae": d_sae},
        "topk": {"architecture": "topk", "k": k, "d_sae": d_sae},
        "batchtopk": {"architecture": "batchtopk", "k": k, "d_sae": d_sae},
        "matryoshka": {"architecture": "matryoshka", "k": k, "d_sae": d_sae},
        "topafa": {"architecture": "topafa", "target_l0": true_l0, "d_sae": d_sae},
    }


def true_l0(truth: SyntheticActivations, n: int = 8192) -> float:
    """Mean number of firing features per row of `truth`, on a fixed sample."""
    return float((truth.sample_codes(n, torch.Generator().manual_seed(7)) > 0).sum(1).float().mean())


@torch.no_grad()
def recovery_metrics(sae: SAE, truth: SyntheticActivations, n_eval: int = 8192, threshold: float = 0.9) -> dict:
    """FVU, L0, dead fraction, shrinkage γ on fresh rows, and how well decoder rows match the true directions.

    MMCS = mean over true features of the best cosine with any decoder row; `recovered` = fraction of true
    features whose best cosine exceeds `threshold`.
    """
    sae.eval()
    x = truth.sample(n_eval, torch.Generator().manual_seed(12345)).to(sae.W_dec.device)
    f = sae.encode(x)
    acc = ReconstructionMetrics(sae.d_sae)
    acc.update(x, sae.decode(f), f, sae.b_dec)
    m = acc.result()
    dec = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = truth.directions.to(dec) @ dec.T  # [n_features, d_sae]
    best = cos.max(dim=1).values
    return {
        "fvu": m["fvu"],
        "l0": m["l0"],
        "dead_fraction": m["dead_fraction"],
        "shrinkage_gamma": m["shrinkage_gamma"],
        "mmcs": float(best.mean()),
        "recovered": float((best > threshold).float().mean()),
        "true_l0": true_l0(truth, n_eval),
    }


def train_synthetic(truth: SyntheticActivations, specs: list[dict], steps: int, batch_size: int, seed: int = 0):
    """Train every spec on one shared synthetic stream; return ([(spec, recovery metrics)], wall seconds)."""
    import time

    from saeflow.sae.architectures.registry import build_sae, config_from_dict
    from saeflow.sae.training import TrainingConfig, train_saes

    torch.manual_seed(seed)
    saes = [build_sae(config_from_dict(s), truth.cfg.d) for s in specs]
    cfg = TrainingConfig(batch_size=batch_size, log_every=10_000, seed=seed, dead_tokens=batch_size * 50)
    t0 = time.perf_counter()
    train_saes(
        saes,
        truth.batches(batch_size, steps, seed=seed + 1),
        cfg,
        steps * batch_size,
        b_dec_sample=truth.sample(4096, torch.Generator().manual_seed(seed + 2)),
        progress=False,
    )
    wall = time.perf_counter() - t0
    return [(s, recovery_metrics(m, truth)) for s, m in zip(specs, saes)], wall
