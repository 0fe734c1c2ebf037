"""Ground-truth recovery on synthetic superposition data, for every registered architecture.

    .venv/bin/python benchmarks/synthetic.py                # the default instance, ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/synthetic.py --d 128 --features 512 --steps 4000

Activations are sparse non-negative combinations of known unit directions (more features than dimensions,
power-law firing frequencies, co-firing groups, a mean offset, small noise; see sae/evaluation/synthetic.py). Each
architecture trains on the same stream; the table reports FVU, L0, dead fraction, MMCS (mean over true features of
the best cosine with a decoder row), the fraction of true features recovered at cos > 0.9, and shrinkage γ
(1 = no shrinkage, < 1 = the SAE shrinks). All SAEs of one run share every batch (one data pass).
"""

from __future__ import annotations

import argparse

from saeflow.sae import ARCHITECTURES
from saeflow.sae.evaluation.synthetic import REFERENCE_SPECS, SyntheticActivations, SyntheticConfig, train_synthetic


def default_specs(d_sae: int, only: list[str] | None = None) -> dict[str, dict]:
    """Name → spec (saeflow.sae.evaluation.synthetic.REFERENCE_SPECS) for every registered architecture, or
    those in `only`."""
    return {
        name: {**spec, "d_sae": d_sae}
        for name, spec in REFERENCE_SPECS.items()
        if spec["architecture"] in ARCHITECTURES and (not only or spec["architecture"] in only)
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--features", type=int, default=128)
    p.add_argument("--expansion", type=float, default=2.0, help="d_sae = expansion × true features")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--arch", nargs="*", help="architectures to run (default: all registered)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    truth = SyntheticActivations(SyntheticConfig(d=a.d, n_features=a.features, seed=a.seed))
    labelled = default_specs(int(a.expansion * a.features), a.arch)
    specs = list(labelled.values())
    rows, wall = train_synthetic(truth, specs, a.steps, a.batch_size, a.seed)
    true_l0 = rows[0][1]["true_l0"]
    print(
        f"synthetic: d={a.d}, {a.features} true features, true L0 {true_l0:.2f}, d_sae={specs[0]['d_sae']}, "
        f"{a.steps} steps × {a.batch_size} rows, {wall:.0f} s for all {len(specs)} SAEs on one stream"
    )
    print(f"| {'architecture':<29} | {'FVU':>7} | {'L0':>6} | {'dead':>5} | {'MMCS':>6} | {'rec>0.9':>7} | {'γ':>6} |")
    print("|" + "---|" * 7)
    for name, (spec, m) in zip(labelled, rows):
        knobs = " ".join(f"{k} {v:g}" for k, v in spec.items() if k not in ("architecture", "lr", "d_sae"))
        label = f"{name} ({knobs})" if knobs else name
        print(
            f"| {label:<29} | {m['fvu']:7.4f} | {m['l0']:6.2f} | {m['dead_fraction']:5.2f} | "
            f"{m['mmcs']:6.3f} | {m['recovered']:7.1%} | {m['shrinkage_gamma']:6.3f} |"
        )


if __name__ == "__main__":
    main()
