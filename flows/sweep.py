"""sae_sweep: the pipeline over a grid of SAEs (architectures × sparsity knobs × sites), then the frontier report."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import run_stages
from saeflow.config import PipelineConfig
from tasks.report import report_frontier
from tasks.tracking import finish_pipeline_run, start_pipeline_run


@flow(name="sae_sweep", log_prints=True)
def sae_sweep(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate every SAE of `config.sweep`'s grid at every site (a site's grid from one data pass when
    `train.group_by_site`), then log L0–fidelity frontiers and the needed-L0 table to the parent run."""
    if config.sweep is None:
        raise ValueError(f"config {config.name!r} has no `sweep:` section; use `saeflow run` for a plain pipeline")
    run_id = start_pipeline_run(config, "sae_sweep")
    results: dict[str, Any] = {}
    try:
        run_stages(config, run_id, results)
        table = report_frontier(config, run_id, results)
    except BaseException:
        finish_pipeline_run(config, run_id, results, status="FAILED")
        raise
    finish_pipeline_run(config, run_id, results)
    return {"run_id": run_id, "metrics": results, "comparison": table}
