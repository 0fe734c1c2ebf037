"""sae_sweep: the pipeline over a grid of SAEs (architectures × sparsity knobs × sites), then the frontier report."""

from __future__ import annotations

from typing import Any

from prefect import flow

from saeflow.config import PipelineConfig
from saeflow.flows.pipeline import run_tracked
from saeflow.tasks.report import report_frontier


@flow(name="sae_sweep", log_prints=True)
def sae_sweep(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate every SAE of `config.sweep`'s grid at every site (a site's grid from one data pass when
    `train.group_by_site`), then log L0–fidelity frontiers and the needed-L0 table to the parent run."""
    if config.sweep is None:
        raise ValueError(f"config {config.name!r} has no `sweep:` section; use `saeflow run` for a plain pipeline")
    return run_tracked(
        config, "sae_sweep", report=lambda run_id, results: {"comparison": report_frontier(config, run_id, results)}
    )
