"""sae_sweep: the pipeline over a grid of SAEs (architectures × sparsity knobs × sites), then the frontier report."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import training_groups
from saeflow.config import PipelineConfig
from tasks.evaluate import evaluate_site_saes
from tasks.extract import extract_activations
from tasks.report import report_frontier
from tasks.stats import compute_stats
from tasks.tokenize import tokenize_dataset
from tasks.tracking import finish_pipeline_run, log_token_manifest, start_pipeline_run
from tasks.train import train_site_saes


@flow(name="sae_sweep", log_prints=True)
def sae_sweep(config: PipelineConfig) -> dict[str, Any]:
    """Train and evaluate every SAE of `config.sweep`'s grid at every site (a site's grid from one data pass when
    `train.group_by_site`), then log L0–fidelity frontiers and the needed-L0 table to the parent run."""
    if config.sweep is None:
        raise ValueError(f"config {config.name!r} has no `sweep:` section; use `saeflow run` for a plain pipeline")
    run_id = start_pipeline_run(config)
    results: dict[str, Any] = {}
    try:
        tokens = tokenize_dataset(config)
        log_token_manifest(config, run_id, tokens)
        acts = extract_activations(config, tokens)
        stats = compute_stats(config, acts, run_id)
        for site, specs in training_groups(config):
            trained = train_site_saes(config, acts, stats[site], site, specs, run_id)
            results.setdefault(site, {}).update(evaluate_site_saes(config, tokens, stats[site], site, trained))
        table = report_frontier(config, run_id, results)
    except BaseException:
        finish_pipeline_run(config, run_id, results, status="FAILED")
        raise
    finish_pipeline_run(config, run_id, results)
    return {"run_id": run_id, "metrics": results, "comparison": table}
